"""Write a small DICOM whole-slide image (VL Whole Slide Microscopy, TILED_FULL) with pydicom.

Enough of the standard for OpenSlide to open it: one VOLUME instance, uncompressed RGB frames
(or baseline JPEG), the pixel spacing in the shared functional groups.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

WSI_STORAGE = "1.2.840.10008.5.1.4.1.1.77.1.6"


def write_dicom_wsi(folder: Path, rgb: np.ndarray, mpp_um: float, *, tile: int = 256, jpeg: bool = False,
                    image_type: str = "VOLUME", series_uid: str = "1.2.826.0.1.3680043.8.498.1") -> Path:
    """Write ``rgb`` (H, W, 3 uint8) as ``folder/<image_type>.dcm``; returns the file.

    The instances of one slide share ``series_uid`` (and study and frame of reference): OpenSlide,
    given any file of the folder, reads the series it belongs to.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    h, w = rgb.shape[:2]
    ty, tx = -(-h // tile), -(-w // tile)
    canvas = np.full((ty * tile, tx * tile, 3), 255, np.uint8)
    canvas[:h, :w] = rgb
    frames = [canvas[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] for r in range(ty) for c in range(tx)]

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = WSI_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEGBaseline8Bit if jpeg else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = WSI_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = f"{series_uid}.1", series_uid, f"{series_uid}.2"
    ds.Modality = "SM"
    ds.ImageType = ["ORIGINAL", "PRIMARY", image_type, "NONE"]
    ds.PatientName, ds.PatientID, ds.StudyID = "Phantom", "0", "0"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.Manufacturer = "marrowseg tests"
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
    ds.PhotometricInterpretation = "YBR_FULL_422" if jpeg else "RGB"
    ds.NumberOfFrames, ds.Rows, ds.Columns = len(frames), tile, tile
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows, ds.TotalPixelMatrixFocalPlanes = w, h, 1
    path = Dataset()
    path.OpticalPathIdentifier = "1"
    ds.OpticalPathSequence, ds.NumberOfOpticalPaths = Sequence([path]), 1
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem, origin.YOffsetInSlideCoordinateSystem = 0.0, 0.0
    ds.TotalPixelMatrixOriginSequence = Sequence([origin])
    ds.ImageOrientationSlide = [0, 1, 0, 1, 0, 0]
    measures = Dataset()
    measures.PixelSpacing = [mpp_um / 1000.0, mpp_um / 1000.0]  # mm
    measures.SliceThickness = 0.003
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = w * mpp_um / 1000.0, h * mpp_um / 1000.0
    if jpeg:
        import imagecodecs

        ds.PixelData = encapsulate([imagecodecs.jpeg8_encode(f, level=95) for f in frames])
        ds.LossyImageCompression = "01"
    else:
        ds.PixelData = np.stack(frames).tobytes()
    out = folder / f"{image_type.lower()}.dcm"
    ds.save_as(out, enforce_file_format=True)
    return out
