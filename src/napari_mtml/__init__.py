"""napari-mtml: localise unseen medical anomalies from healthy scans alone.

Implements "Many Tasks Make Light Work" (Baugh et al., MICCAI 2023): five synthetic anomaly
tasks, cross-validation over tasks, ensemble inference, metrics, a CLI (`mtml`) and a napari
plugin. The core never imports Qt or napari; only `napari_mtml._napari` does.
"""

__version__ = "0.1.0"
