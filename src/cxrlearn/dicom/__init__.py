"""Into the hospital's workflow: results as DICOM objects a PACS stores and a viewer shows, and a DICOM node.

- :mod:`cxrlearn.dicom.results`: for one DICOM radiograph, a structured report (TID 1500, one TID 1501 group per
  finding, built with highdicom) and a secondary capture of the Grad-CAM overlay, in the source's study, with
  UIDs derived from the source and the bundle (sending the same image twice never makes duplicates).
- :mod:`cxrlearn.dicom.outbox`: the on-disk queue in which received images and results wait until the
  destination has confirmed them.
- :mod:`cxrlearn.dicom.predicting`: the step the node and the poller share, received instances to queued results.
- :mod:`cxrlearn.dicom.node`: ``cxrlearn dicom listen``, a C-STORE SCP (pynetdicom) that predicts in the
  background and sends the results on.
- :mod:`cxrlearn.dicom.poll`: ``cxrlearn dicom poll``, the same over DICOMweb (QIDO-RS, WADO-RS, STOW-RS with
  dicomweb-client).

This package imports pydicom, highdicom, pynetdicom and dicomweb-client at its top: nothing below it imports it.
"""
