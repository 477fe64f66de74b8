"""Production monitoring of the photos the server is sent: data drift against the training set.

- :mod:`cvgen.monitor.features`: the per-photo drift features (``photo_features``).
- :mod:`cvgen.monitor.profile`: the training photos' reference profile (``ReferenceProfile``).
- :mod:`cvgen.monitor.featurelog`: the server's per-request feature log (``FeatureLog``) and
  its reader.
- :mod:`cvgen.monitor.rolling`: a rolling drift score per feature for ``/metrics``
  (``RollingDrift``).
- :mod:`cvgen.monitor.report`: the drift report with Evidently (the ``monitor`` extra).
- :mod:`cvgen.monitor.metric_names`: every metric name the server exports.

Only the report needs the ``monitor`` extra; the rest runs in the serving install (the face
features need OpenCV). In a server::

    from cvgen.monitor.featurelog import FeatureLog
    from cvgen.monitor.features import feature_detector, photo_features
    from cvgen.monitor.profile import ReferenceProfile
    from cvgen.monitor.rolling import RollingDrift

    profile = ReferenceProfile.load("data/prepared/reference_profile.json")  # ProfileError
    detector = feature_detector(profile.extractor["cascade"])  # thread-safe; needs cv2
    rolling = RollingDrift(profile, window=500, min_samples=50)  # thread-safe
    registry.register(rolling.collector())  # cvgen_drift_score{feature}, computed per scrape
    log = FeatureLog("logs/features.jsonl", enabled=True)  # process-safe, never raises

    features = photo_features(image, detector)  # per request, on the decoded upload (~30 ms)
    log.write(features)
    rolling.add(features)
"""
