"""From a file to 8-bit grayscale pixels: PNG, JPEG, TIFF and DICOM, with the pixel budget and errors naming the file."""
