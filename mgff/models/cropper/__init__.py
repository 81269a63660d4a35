"""Localisation for the second stage: where is the object, as a response map, a box and a crop.

The MGFF paper (design.md §1) runs a ViT on the image, turns its attention matrices into an
importance per patch token, reshapes the ``N = H/16 x W/16`` weights to the token grid, upsamples
them bilinearly to a response map the size of the image, boxes the object on that map and cuts the
box out, enlarged, for a second classification. One concept per file, in the order the data flows:

``vit_attention.py``      image -> ``(L, B, heads, T, T)`` attention (``forward_with_attention``)
``importance.py``         attention -> ``(B, N)`` patch importance (``attention_rollout``,
                          ``column_sum_importance``)
``response.py``           importance -> ``(B, H, W)`` map in [0, 1] (``response_map``)
``boxes.py``              map -> ``(B, 4)`` xyxy boxes (``boxes_from_response_map``)
``crops.py``              images, boxes -> ``(B, C, S, S)`` crops (``crop_and_resize``, ``CropOutput``)
``attention_cropper.py``  the ViT localiser: all of the above behind one module (``AttentionCropper``)

Shapes: ``B`` images, ``L`` attention layers, ``T = P + N`` tokens of which the first ``P`` are
prefix tokens (class / register tokens, ``vit.num_prefix_tokens``) and ``N = h * w`` patch tokens
on an ``h x w`` grid. Boxes are ``(x1, y1, x2, y2)`` in continuous pixel coordinates: pixel ``i``
spans ``[i, i + 1)``, so the whole ``H x W`` image is ``(0, 0, W, H)``.
"""
