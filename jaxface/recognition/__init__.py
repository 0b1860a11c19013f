"""Face verification and recognition on top of ``jaxface.faces`` embeddings.

* :mod:`jaxface.recognition.gallery` -- enrolled identities in SQLite (:class:`Gallery`).
* :mod:`jaxface.recognition.search` -- jitted, chunked 1:K identification and 1:1 verification.
* :mod:`jaxface.recognition.sharded_search` -- the same 1:K search with the gallery sharded over
  devices (``SearchIndex(..., devices=jax.devices())``).
* :mod:`jaxface.recognition.calibrate` -- thresholds from labeled pairs.
* :mod:`jaxface.recognition.score_norm` -- cohort S-norm of distance scores (score-level fusion).
* :mod:`jaxface.recognition.siamese` -- logistic-regression head on embedding pairs.
* :mod:`jaxface.recognition.encoders` -- images -> embeddings with an encoder fingerprint.

Distances are Euclidean between embeddings; "same person" means
``distance <= threshold`` (dlib's default threshold is 0.6).
"""

from jaxface.recognition.gallery import Gallery, GalleryError

__all__ = ["Gallery", "GalleryError"]
