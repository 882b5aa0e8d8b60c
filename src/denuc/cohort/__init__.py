"""Running DeNuC over a cohort of images or slides with several processes on one or many hosts.

* :mod:`denuc.cohort.runner`: the one engine that runs a cohort into an output folder (skip
  done inputs, refuse those made with other settings, claims, failures, ``summary.csv``), called
  by ``denuc predict``, ``denuc detect``, ``DeNuC.predict_many`` and ``Detector.detect_cohort``.
* :mod:`denuc.cohort.inputs`: turn files, folders, globs and list files into one sorted input
  list; static sharding (``--shard I/N``) and the process's rank and world size.
* :mod:`denuc.cohort.claims`: exclusive per-input claims in the output folder (a shared file
  system), so processes that do not talk to each other share the work dynamically and a crashed
  process's input is taken over.
* :mod:`denuc.cohort.summary`: merge the per-input ``<stem>.summary.json`` files into one
  ``summary.csv``, identical whether one or many processes wrote them.
"""
