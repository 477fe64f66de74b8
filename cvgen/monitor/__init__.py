"""Production monitoring of the photos the server is sent: data drift against the training set.

- :mod:`cvgen.monitor.features`: the per-photo drift features (``photo_features``).
- :mod:`cvgen.monitor.profile`: the training photos' reference profile (``ReferenceProfile``).
- :mod:`cvgen.monitor.featurelog`: the server's per-request feature log (``FeatureLog``) and
  its reader.
- :mod:`cvgen.monitor.rolling`: a rolling drift score per feature for ``/metrics``
  (``RollingDrift``).
- :mod:`cvgen.monitor.report`: the drift report with Evidently (the ``monitor`` extra).
- :mod:`cvgen.monitor.metric_names`: every metric name the server exports.

Only the report needs the ``monitor`` extra; the rest runs in the serving install (face
features need OpenCV).
"""
