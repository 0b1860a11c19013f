"""Face verification and recognition on top of ``jaxface.faces`` embeddings.

* :mod:`jaxface.recognition.gallery` -- enrolled identities in SQLite (:class:`Gallery`).
* :mod:`jaxface.recognition.search` -- jitted, chunked 1:K identification and 1:1 verification.
* :mod:`jaxface.recognition.sharded_search` -- the same 1:K search with the gallery sharded over
  devices (``SearchIndex(..., devices=jax.devices())``).
* :mod:`jaxface.recognition.calibrate` -- thresholds from labeled pairs.
* :mod:`jaxface.recognition.open_set` -- one-shot 1:K: thresholds for a false-positive
  identification rate (FPIR) at a gallery size, DIR at FPIR.
* :mod:`jaxface.recognition.score_norm` -- cohort S-norm of distance scores (fusion, S-norm search).
* :mod:`jaxface.recognition.known_cache` -- embeddings of known-face folders, cached by content.
* :mod:`jaxface.recognition.siamese` -- logistic-regression head on embedding pairs.
* :mod:`jaxface.recognition.encoders` -- images -> embeddings with an encoder fingerprint.

Distances are Euclidean between embeddings; "same person" means
``distance <= threshold`` (dlib's default threshold is 0.6), or, for a gallery
calibrated with S-norm, ``score <= threshold``.
"""

from jaxface.recognition.gallery import Gallery, GalleryError

__all__ = ["Gallery", "GalleryError"]
