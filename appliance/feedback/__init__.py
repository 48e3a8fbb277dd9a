"""Feedback in: corrections of decisions (:mod:`~appliance.feedback.core`), the review queue
(:mod:`~appliance.feedback.queue`), and the ``appliance feedback`` and ``retrain`` commands."""
