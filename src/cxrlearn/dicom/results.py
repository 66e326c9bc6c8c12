"""One DICOM radiograph's results as two DICOM objects in its own study: a structured report and a heatmap.

- **Structured report** (Comprehensive 3D SR holding a TID 1500 Measurement Report, built with highdicom): one
  TID 1501 group per finding, with the probability (DCM 122157 "Probability", no units), the bundle's threshold
  and, where the bundle has thresholds, the call as a qualitative evaluation Present/Absent (SNOMED CT); one more
  group for the input check, with its verdict, reason and score. The device observer is cxrlearn; every group
  names the algorithm (cxrlearn's version, the bundle's SHA-256). The source image is the evidence.
  ``VerificationFlag`` is UNVERIFIED and the series description says it is not for diagnostic use.
- **Segmentation** (fractional, highdicom): the Grad-CAM of each finding called present (else of the most probable
  one) as one segment each, registered pixel for pixel to the source image, so that a viewer draws it over the
  radiograph in its own colours and a reader can switch it off; JPEG-LS lossless (a smooth map: 7.5 MB of a
  3,000 x 2,500 radiograph's segment is 0.8 MB). The report lists it among its evidence (Current Requested
  Procedure Evidence). Not as a TID 1410/1411 group per segment: with one such group, PixelMed's validator applies
  its conditions to every TID 1501 group of the report (two errors each). Not a Parametric Map: that IOD requires
  a Frame of Reference, plane position and orientation, which a projection radiograph (CR, DX) has none of
  (dciodvfy names them), and 16- or 32-bit values. DICOM's fractional types are probability or occupancy; Grad-CAM
  is neither, so the segmentation says what it is ("Grad-CAM saliency, relative 0-1").
- **Secondary capture** of the Grad-CAM overlay on the original image at its own resolution, with the finding,
  probability and threshold written on it (:func:`cxrlearn.inference.gradcam.annotated_overlay`), marked the
  same way, ``BurnedInAnnotation`` YES: what every PACS can show.

:class:`Heatmaps` (``--heatmap``) chooses the heatmap objects: both by default.

All copy the patient, study and accession of the source as :func:`cxrlearn.dicom.source.reference` checked them
(a new series each), and have UIDs derived from the source's SOP Instance UID, study and patient and the bundle's
digest (and an ONNX runtime's file, :attr:`Provenance.answer_key`; :func:`derived_uid`): the same image through the same model gives the same objects, so a PACS that
receives them twice stores them once, while two patients' images that share a SOP Instance UID get different ones.
The capture names its source image (SourceImageSequence, ReferencedImageSequence).

Findings are coded in a local scheme (:data:`SCHEME`, PS3.16's "99" prefix for private schemes) under their
cxrlearn names (a bundle's findings are whatever its table named), or as a site's mapping file says
(:mod:`cxrlearn.dicom.codes`, ``--codes``: SNOMED CT, RadLex).
"""

from __future__ import annotations

import io
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import JPEGLSLossless

from cxrlearn import __version__
from cxrlearn._files import read_bytes, write_atomic
from cxrlearn.data.decoding.dicom import DICOM_MAGIC_OFFSET, is_dicom
from cxrlearn.dicom.codes import SCHEME, FindingCodes
from cxrlearn.dicom.routing import Accept
from cxrlearn.dicom.source import (MANUFACTURER, SC_SERIES_NUMBER, SEG_SERIES_NUMBER, SR_SERIES_NUMBER, NotForModel,
                                   patient_key, read_source, reference, study_key)
from cxrlearn.errors import ConfigError, DataError
from cxrlearn.evaluation.operating_points import MIN_VALIDATION_CASES, NOT_CALLED
from cxrlearn.inference.gradcam import annotated_overlay, heatmaps
from cxrlearn.inference.overlays import distinct_names
from cxrlearn.inference.predictor import Prediction, Predictor

#: What every object says of itself, in its series description.
NOT_FOR_DIAGNOSIS = "not for diagnostic use"
#: TID 1500's "Procedure reported", from its context group (CID 100): PixelMed's validator refuses SNOMED's "Plain
#: chest X-ray" there. That it is a chest radiograph, the evidence (the source image's own attributes) says.
PROCEDURE_REPORTED = Code("363679005", "SCT", "Imaging procedure")
THRESHOLD = Code("THRESHOLD", SCHEME, "Decision threshold")
INPUT_CHECK = Code("INPUTCHECK", SCHEME, "Input check")
INPUT_SCORE = Code("INPUTSCORE", SCHEME, "Input check score")
LIKE_TRAINING = Code("OK", SCHEME, "Like the training images")
UNLIKE_TRAINING = Code("WARNING", SCHEME, "Unlike the training images")
UNAVAILABLE = Code("UNAVAILABLE", SCHEME, "Input check unavailable")
ANALYSIS = Code("ANALYSIS", SCHEME, "Analysis by the model")
NOT_ANALYSED = Code("NOTANALYSED", SCHEME, "Not analysed")
NO_UNITS = Code("1", "UCUM", "no units")
#: What a heatmap segment is of (CID 7150) and by what kind of algorithm (CID 7162).
HEATMAP_CATEGORY = codes.SCT.MorphologicallyAbnormalStructure
HEATMAP_FAMILY = codes.DCM.ArtificialIntelligence
#: The segmentation's fractional values: 0-255 for Grad-CAM's 0-1.
HEATMAP_LEVELS = 255
#: The heatmap objects ``--heatmap`` may name.
HEATMAP_KINDS = ("segmentation", "capture")


def derived_uid(source_uid: str, model_sha256: str, kind: str) -> str:
    """A UID under 2.25 (a UUID's integer, PS3.5 B.2): a name-based UUID (RFC 4122 version 5) of the source
    (its :func:`~cxrlearn.dicom.source.patient_key`: instance, study and patient), the bundle and what is derived,
    so the same three always give the same UID. (pydicom's
    ``generate_uid`` ignores its entropy sources under 2.25 and returns a random UUID.)"""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, '|'.join([str(source_uid), model_sha256, kind])).int}"


@dataclass(frozen=True)
class Heatmaps:
    """Which heatmap objects go with each report (``--heatmap``): a segmentation a viewer can switch on and off,
    a secondary capture every PACS can show, both (the default) or neither."""

    segmentation: bool = True
    capture: bool = True

    @classmethod
    def parse(cls, text: str | None) -> Heatmaps:
        """``segmentation``, ``capture``, ``segmentation,capture`` or ``none``; refused by name otherwise."""
        if text is None:
            return cls()
        words = {w.strip().lower() for w in text.split(",") if w.strip()}
        if words == {"none"}:
            return cls(False, False)
        if not words or not words <= set(HEATMAP_KINDS):
            raise ConfigError(f"--heatmap {text!r}: expected {', '.join(HEATMAP_KINDS)}, both (comma-separated) "
                              f"or none")
        return cls("segmentation" in words, "capture" in words)


@dataclass(frozen=True)
class ResultOptions:
    """How the DICOM results are made: the heatmap objects (``--heatmap``), the findings' codes (``--codes``), and
    whether a radiograph the model is not for gets a report saying so (``--not-analysed-report``)."""

    heatmaps: Heatmaps = Heatmaps()
    codes: FindingCodes = FindingCodes()
    not_analysed: bool = False


@dataclass(frozen=True)
class DicomResults:
    """The objects made for one source instance."""

    report: Dataset  # the structured report
    capture: Dataset | None  # the secondary capture of the heatmap
    segmentation: Dataset | None = None  # the heatmaps as a fractional segmentation

    def files(self) -> dict[str, bytes]:
        """``{"sr": bytes, "sc": bytes, "seg": bytes}`` (those made): each as a DICOM file (Part 10)."""
        made = {"sr": self.report, "sc": self.capture, "seg": self.segmentation}
        return {kind: to_bytes(ds) for kind, ds in made.items() if ds is not None}


def to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _algorithm(predictor: Predictor) -> hd.sr.AlgorithmIdentification:
    provenance = predictor.provenance
    return hd.sr.AlgorithmIdentification(
        name=MANUFACTURER, version=f"{provenance.cxrlearn_version} {predictor.meta.backbone}",
        parameters=[f"model_sha256={provenance.model_sha256}", f"runtime={provenance.runtime}",
                    f"runtime_sha256={provenance.runtime_sha256}",
                    f"operating_point={predictor.meta.threshold_method or 'none'} chosen on validation, findings "
                    f"with fewer than {MIN_VALIDATION_CASES} validation positives or negatives not called"])


def _finding_group(predictor: Predictor, prediction: Prediction, finding: str, source: Dataset,
                   algorithm: hd.sr.AlgorithmIdentification, code: Code) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    measurements = [hd.sr.Measurement(name=codes.DCM.Probability, value=round(prediction.probabilities[finding], 6),
                                      unit=NO_UNITS)]
    evaluations = None
    threshold = (predictor.thresholds or {}).get(finding)
    if threshold is not None and prediction.positive is not None:
        measurements.append(hd.sr.Measurement(name=THRESHOLD, value=round(float(threshold), 6), unit=NO_UNITS))
        evaluations = [hd.sr.QualitativeEvaluation(
            name=code, value=codes.SCT.Present if finding in prediction.positive else codes.SCT.Absent)]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(patient_key(source), predictor.provenance.answer_key, f"track {finding}"),
            identifier=f"cxrlearn {finding}"[:64]),
        finding_type=code, algorithm_id=algorithm, measurements=measurements, qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)])
    if finding in prediction.not_called:  # a probability, and in words why there is no call
        group[0].ContentSequence.append(hd.sr.TextContentItem(
            name=codes.DCM.Comment, value=NOT_CALLED, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    return group


def _input_check_group(predictor: Predictor, prediction: Prediction, source: Dataset,
                       algorithm: hd.sr.AlgorithmIdentification) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    verdict = prediction.verdict
    value = UNAVAILABLE if verdict is None else LIKE_TRAINING if verdict.ok else UNLIKE_TRAINING
    measurements = None
    if prediction.input_score is not None:
        measurements = [hd.sr.Measurement(name=INPUT_SCORE, value=float(prediction.input_score), unit=NO_UNITS)]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(patient_key(source), predictor.provenance.answer_key, "track input check"),
            identifier="cxrlearn input check"),
        finding_type=INPUT_CHECK, algorithm_id=algorithm, measurements=measurements,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=INPUT_CHECK, value=value)])
    # The reason in words, as predict's input_check column gives it ("ok" or "warning: ...").
    group[0].ContentSequence.append(hd.sr.TextContentItem(
        name=codes.DCM.Comment, value=prediction.input_check[:1024],
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    return group


def _device(predictor: Predictor) -> hd.sr.ObserverContext:
    """The device observer every report names: cxrlearn, with the backbone as its model."""
    digest = predictor.provenance.answer_key
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid(digest, digest, "device"), name=MANUFACTURER, manufacturer_name=MANUFACTURER,
            model_name=predictor.meta.backbone[:64]))


def structured_report(source: Dataset, prediction: Prediction, predictor: Predictor,
                      segmentation: Dataset | None = None, finding_codes: FindingCodes = FindingCodes()) -> Dataset:
    """The TID 1500 report of one prediction, in the source's study (see the module's description); with
    ``segmentation``, that too among its evidence."""
    algorithm = _algorithm(predictor)
    observer = _device(predictor)
    groups = [_finding_group(predictor, prediction, finding, source, algorithm, finding_codes.code(finding))
              for finding in predictor.findings]
    groups.append(_input_check_group(predictor, prediction, source, algorithm))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE_REPORTED, imaging_measurements=groups)
    return _document(source, report, predictor, "sr", [] if segmentation is None else [segmentation])


def _document(source: Dataset, report: hd.sr.MeasurementReport, predictor: Predictor, kind: str,
              more_evidence: list[Dataset]) -> Dataset:
    """``report`` as a Comprehensive 3D SR in the source's study and cxrlearn's report series, its UID derived
    from the source, the bundle and ``kind``; unverified, dated, the local scheme declared."""
    digest = predictor.provenance.answer_key
    sr = hd.sr.Comprehensive3DSR(
        evidence=[source, *more_evidence], content=report,
        series_instance_uid=derived_uid(study_key(source), digest, "sr series"), series_number=SR_SERIES_NUMBER,
        sop_instance_uid=derived_uid(patient_key(source), digest, kind), instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True, is_verified=False,
        series_description=f"cxrlearn AI findings - {NOT_FOR_DIAGNOSIS}",
        software_versions=__version__, manufacturer_model_name=predictor.meta.backbone[:64])
    sr.SeriesDate, sr.SeriesTime = sr.ContentDate, sr.ContentTime  # a PACS lists the series by its date
    _declare_scheme(sr)
    return sr


def not_analysed_report(refused: NotForModel, name: str, predictor: Predictor) -> Dataset:
    """A TID 1500 report that the model did not analyse this radiograph, and why (the routing rule's reason): one
    group whose evaluation is "Not analysed", with the reason as its comment; no probabilities. :class:`DataError`
    naming ``name`` where the header cannot be referred to (:func:`cxrlearn.dicom.source.reference`)."""
    source = reference(refused.header, name, secondary_captures=True)
    digest = predictor.provenance.answer_key
    algorithm = _algorithm(predictor)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(patient_key(source), digest, "track not analysed"), identifier="cxrlearn analysis"),
        finding_type=ANALYSIS, algorithm_id=algorithm,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=ANALYSIS, value=NOT_ANALYSED)])
    group[0].ContentSequence.append(hd.sr.TextContentItem(
        name=codes.DCM.Comment, value=str(refused).split(": ", 1)[-1][:1024],
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=_device(predictor)),
        procedure_reported=PROCEDURE_REPORTED, imaging_measurements=[group])
    return _document(source, report, predictor, "sr not analysed", [])


def _declare_scheme(ds: Dataset) -> None:
    """The local scheme declared (PS3.3 C.12.1.1.2), so that a reader knows whose codes they are."""
    scheme = Dataset()
    scheme.CodingSchemeDesignator, scheme.CodingSchemeName = SCHEME, "cxrlearn findings and concepts"
    scheme.CodingSchemeResponsibleOrganization = "cxrlearn"
    ds.CodingSchemeIdentificationSequence = [scheme]


def heatmap_findings(prediction: Prediction) -> list[str]:
    """The findings heatmaps are made for, most probable first: those called present, else the most probable."""
    chosen = prediction.positive or [max(prediction.probabilities, key=prediction.probabilities.get)]
    return sorted(chosen, key=prediction.probabilities.get, reverse=True)


def shown_finding(prediction: Prediction) -> str:
    """The finding the capture is drawn for: the most probable positive one, else the most probable."""
    return heatmap_findings(prediction)[0]


def heatmap_segmentation(source: Dataset, decoded: np.ndarray, heat: dict[str, np.ndarray], predictor: Predictor,
                         finding_codes: FindingCodes = FindingCodes()) -> Dataset:
    """The fractional segmentation of ``heat`` (Grad-CAM per finding, at the model's input size), each resized
    to the source's pixel matrix (as the capture draws it) and stored as one segment."""
    rows, columns = decoded.shape[:2]
    stack = np.stack([cv2.resize(h.astype(np.float32), (columns, rows), interpolation=cv2.INTER_LINEAR)
                      for h in heat.values()], axis=-1)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=MANUFACTURER, version=f"{__version__} {predictor.meta.backbone}"[:64], family=HEATMAP_FAMILY,
        parameters={"model_sha256": predictor.provenance.model_sha256, "method": "Grad-CAM"})
    segments = [hd.seg.SegmentDescription(
        segment_number=number, segment_label=f"{finding} Grad-CAM"[:64],
        segmented_property_category=HEATMAP_CATEGORY, segmented_property_type=finding_codes.code(finding),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm)
        for number, finding in enumerate(heat, start=1)]
    digest = predictor.provenance.answer_key
    segmentation = hd.seg.Segmentation(
        source_images=[source], pixel_array=np.clip(stack, 0.0, 1.0)[None],
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL, segment_descriptions=segments,
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY, max_fractional_value=HEATMAP_LEVELS,
        series_instance_uid=derived_uid(study_key(source), digest, "seg series"), series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=derived_uid(patient_key(source), digest, "seg"), instance_number=1,
        manufacturer=MANUFACTURER, manufacturer_model_name=predictor.meta.backbone[:64],
        software_versions=__version__, device_serial_number=digest[:16], omit_empty_frames=False,
        transfer_syntax_uid=JPEGLSLossless,
        series_description=f"cxrlearn heatmaps - {NOT_FOR_DIAGNOSIS}",
        content_description="Grad-CAM saliency, relative 0-1 (not a probability)", content_label="GRADCAM")
    segmentation.SeriesDate, segmentation.SeriesTime = segmentation.ContentDate, segmentation.ContentTime
    segmentation.PatientOrientation = _orientation(source)  # Type 2C: required without a frame of reference
    _declare_scheme(segmentation)
    return segmentation


def _orientation(source: Dataset) -> list[str]:
    """The source's PatientOrientation (checked by :func:`cxrlearn.dicom.source.reference`), else a PA chest's."""
    return list(getattr(source, "PatientOrientation", None) or ["L", "F"])


def heatmap_capture(source: Dataset, decoded: np.ndarray, prediction: Prediction, predictor: Predictor,
                    heat: np.ndarray) -> Dataset:
    """The secondary capture: :func:`shown_finding`'s Grad-CAM (``heat``, computed once by :func:`dicom_results`)
    over the decoded source at its own resolution."""
    finding = shown_finding(prediction)
    picture = annotated_overlay(decoded, heat, finding, prediction.probabilities[finding],
                                (predictor.thresholds or {}).get(finding))
    digest = predictor.provenance.answer_key
    capture = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=picture, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=derived_uid(study_key(source), digest, "sc series"), series_number=SC_SERIES_NUMBER,
        sop_instance_uid=derived_uid(patient_key(source), digest, "sc"), instance_number=1,
        manufacturer=MANUFACTURER,
        patient_orientation=tuple(_orientation(source)),
        series_description=f"cxrlearn heatmap - {NOT_FOR_DIAGNOSIS}", software_versions=__version__)
    capture.BurnedInAnnotation = "YES"
    capture.SeriesDate, capture.SeriesTime = capture.ContentDate, capture.ContentTime
    capture.Laterality = source.get("Laterality", "")  # Type 2C: the chest is not a paired part, so empty
    capture.ImageComments = (f"Grad-CAM of {finding} by cxrlearn {__version__} (model sha256 "
                             f"{predictor.provenance.model_sha256}): research "
                             f"use, {NOT_FOR_DIAGNOSIS}")[:10240]
    capture.DerivationDescription = f"Grad-CAM heatmap of {finding} over the source image"[:1024]
    capture.SourceImageSequence = [_image_reference(source)]
    capture.ReferencedImageSequence = [_image_reference(source)]
    return capture


def _image_reference(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = source.SOPClassUID, source.SOPInstanceUID
    return item


def dicom_results(source: Dataset, decoded: np.ndarray, prediction: Prediction, predictor: Predictor,
                  options: ResultOptions = ResultOptions()) -> DicomResults:
    """The report and the heatmap objects ``options`` names for one source instance (its
    :func:`cxrlearn.dicom.source.reference`); each Grad-CAM is computed once for both."""
    kinds, finding_codes = options.heatmaps, options.codes
    findings = heatmap_findings(prediction)
    wanted = findings if kinds.segmentation else findings[:1] if kinds.capture else []
    heat = heatmaps(predictor, decoded, wanted) if wanted else {}
    segmentation = (heatmap_segmentation(source, decoded, heat, predictor, finding_codes) if kinds.segmentation
                    else None)
    capture = heatmap_capture(source, decoded, prediction, predictor, heat[findings[0]]) if kinds.capture else None
    report = structured_report(source, prediction, predictor, segmentation, finding_codes)
    return DicomResults(report, capture, segmentation)


def result_files(source: Dataset, decoded: np.ndarray, prediction: Prediction, predictor: Predictor, name: str,
                 options: ResultOptions = ResultOptions()) -> dict[str, bytes]:
    """:meth:`DicomResults.files` of one source, or :class:`DataError` naming ``name`` when they cannot be made:
    whatever one instance holds, it fails alone."""
    try:
        return dicom_results(source, decoded, prediction, predictor, options).files()
    except Exception as err:  # noqa: BLE001 - highdicom and pydicom raise many types on values they refuse
        raise DataError(f"{name}: no result can be made for it ({type(err).__name__}: {err})") from None


def not_analysed_file(refused: NotForModel, name: str, predictor: Predictor) -> bytes | None:
    """:func:`not_analysed_report` as a file, or None where no report can refer to the header (it is refused all
    the same)."""
    try:
        return to_bytes(not_analysed_report(refused, name, predictor))
    except Exception:  # noqa: BLE001 - a header no report can copy (DataError, or highdicom's refusals)
        return None


@dataclass(frozen=True)
class Written:
    """What :func:`write_dicom_results` did: files written, inputs that are not DICOM, DICOM ones refused."""

    files: list[Path]
    not_dicom: list[Path]
    refused: list[tuple[Path, str]]


def write_dicom_results(predictor: Predictor, paths: Sequence[Path], predictions: Sequence[Prediction], out: Path,
                        accept: Accept = Accept(), options: ResultOptions = ResultOptions()) -> Written:
    """``out/<name>.sr.dcm``, ``out/<name>.seg.dcm`` and ``out/<name>.sc.dcm`` (as ``options`` say) for each
    DICOM input (``paths[i]`` is the file ``predictions[i]`` was made from); other inputs get none. Each file is
    written whole or not at all."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stems = distinct_names([Path(p) for p in paths])
    files, not_dicom, refused = [], [], []
    for path, prediction in zip(paths, predictions):
        data = read_bytes(path, "DICOM file", DataError)
        if not is_dicom(data[:DICOM_MAGIC_OFFSET + 4], str(path)):
            not_dicom.append(Path(path))
            continue
        try:
            source, decoded = read_source(data, str(path), accept=accept)
            results = result_files(source, decoded, prediction, predictor, str(path), options)
        except NotForModel as err:
            said = not_analysed_file(err, str(path), predictor) if options.not_analysed else None
            if said:
                write_atomic(out / f"{stems[Path(path)]}.sr.dcm", said)
                files.append(out / f"{stems[Path(path)]}.sr.dcm")
            refused.append((Path(path), str(err) + ("; a not-analysed report says so" if said else "")))
            continue
        except DataError as err:
            refused.append((Path(path), str(err)))
            continue
        for kind, content in results.items():
            target = out / f"{stems[Path(path)]}.{kind}.dcm"
            write_atomic(target, content)
            files.append(target)
    return Written(files, not_dicom, refused)
