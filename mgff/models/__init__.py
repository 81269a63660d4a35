"""Model side of mgff: backbones, the fusion head, the attention cropper and the zoo."""
