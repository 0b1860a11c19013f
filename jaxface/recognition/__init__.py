"""Face verification and recognition on top of ``jaxface.faces`` embeddings.

Enrolled identities in SQLite (``gallery``), 1:K search and 1:1 verification
(``search``, ``sharded_search``), thresholds from pairs (``calibrate``) and for a
gallery size (``open_set``, ``calibration``), a Siamese head (``siamese``),
cached known faces (``known_cache``) and encoders with fingerprints (``encoders``);
S-norm is :mod:`jaxface.score_norm`. "Same person" means ``distance <= threshold``
(Euclidean; dlib's default 0.6), or ``score <= threshold`` for a gallery
calibrated with S-norm.
"""

from jaxface.recognition.gallery import Gallery, GalleryError

__all__ = ["Gallery", "GalleryError"]
