"""Figures and tables for looking at mgff's data, its two stages, its fusion head and its errors.

The notebooks in ``notebooks/`` and the :class:`~mgff.callbacks.AttentionMapLogger` call these; each
function returns a matplotlib :class:`~matplotlib.figure.Figure` or a pandas ``DataFrame`` and never
shows anything itself. Figures are built without ``pyplot`` (no global figure registry, nothing to
close in a training loop); in Jupyter they display as the cell's value once ``%matplotlib inline``
is active.

One topic per module, in the order a reader needs them (import from the module; this package file
imports none of them, so training code that draws a response map never loads pandas):

1. ``dataset``: :func:`image_grid`, :func:`sample_grid`, :func:`augmentation_grid`,
   :func:`class_counts`, :func:`image_sizes`, :func:`plot_class_counts`, :func:`plot_image_sizes`,
   :func:`sample_batch`;
2. ``localization`` (the cropper): :func:`response_overlay`, :func:`crop_panel`;
3. ``stages`` (the two stages): :func:`stage_logits`, :func:`stage_predictions`, :func:`plot_stage_predictions`;
4. ``fusion`` (the fusion head): :func:`attention_received`, :func:`super_node_labels`, :func:`fusion_maps`,
   :func:`plot_fusion_maps`;
5. ``errors`` from a ``predictions.csv``: :func:`read_predictions`, :func:`confusion_matrix`,
   :func:`plot_confusion_matrix`, :func:`per_class_accuracy`, :func:`plot_per_class_accuracy`,
   :func:`most_confused_pairs`, :func:`plot_confused_examples`;

and ``drawing``, the helpers they share (:func:`to_display`, box colours).

Conventions: ``B`` images; image tensors are ``(B, 3, H, W)`` normalised with ``mean``/``std`` as
the DataModules produce them (ImageNet statistics by default) and are denormalised for display;
boxes are ``(x1, y1, x2, y2)`` in continuous pixel coordinates (pixel ``i`` spans ``[i, i + 1)``),
drawn exactly there because every image is shown with ``extent=(0, W, H, 0)``; a box of NaNs
(an image without a ground-truth box) is not drawn.
"""
