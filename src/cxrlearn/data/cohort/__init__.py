"""Who is in which part of the study: the patient-wise split, its report and provenance, and table statistics."""
