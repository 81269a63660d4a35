"""Validation of the cropper's string options: one error message for all of them."""

__all__ = ['check_choice']


def check_choice(name: str, value, allowed: tuple) -> None:
    """Raise ``ValueError`` naming the option, the allowed values and the value given."""
    if value not in allowed:
        raise ValueError(f'{name} must be one of {allowed}, got {value!r}')
