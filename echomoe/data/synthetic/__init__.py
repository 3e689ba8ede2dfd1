"""The synthetic ultrasound benchmark: phantom images with exact labels for every task.

Modules (import them directly; this package re-exports nothing, so importing it is free):

* :mod:`~echomoe.data.synthetic.generate` -- :func:`~.generate.generate`, ``make_sample``,
  ``build_dataset_dict`` (region-stratified train / validation / test), ``save_preview``;
* :mod:`~echomoe.data.synthetic.anatomy` -- region views, organ anatomy and lesion geometry;
* :mod:`~echomoe.data.synthetic.phantom` -- B-mode image formation (speckle, attenuation, ...);
* :mod:`~echomoe.data.synthetic.vocab` -- the attribute vocabulary and the diagnosis rules;
* :mod:`~echomoe.data.synthetic.reports` / :mod:`~echomoe.data.synthetic.phrases` -- reports
  written from the attributes, and ``parse_findings``, their exact inverse;
* :mod:`~echomoe.data.synthetic.vqa` -- question / answer pairs from the attributes.
"""
