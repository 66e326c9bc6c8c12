"""Watching a deployed model: the prediction log every answer is recorded in (:mod:`.log`), and the statistics
that judge windows of it against the bundle's reference (:mod:`.drift`)."""
