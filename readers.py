"""
Raw image readers, the lowest layer: PNG/JPG, DICOM files and series, NIfTI and RAD-ChestCT's npz -> checked
float32 arrays (load_xray: (H, W), bright = dense; load_ct, load_radchest: (hu (Z, H, W), spacing_zyx mm) in
CANONICAL orientation), or BadInput(reason). Refused inputs, orientation, pitfalls: DATA.md, "Real data".
Pillow, pydicom and nibabel are optional extras, imported inside the functions that need them.
"""

import importlib
import math
import os

import numpy as np


class BadInput(ValueError):
    """An input that cannot become a sample (corrupt, NaN, constant, too small, ...); the message says why."""


# Voxel budget: every reader multiplies out the shape its file's header declares and refuses a file above this
# BEFORE it reads a pixel, so a 3 MB .nii.gz declaring 1024 x 1024 x 1536 voxels of zeros costs nothing instead of
# ~18 GB (peak memory of one file is a few float32 copies of at most this many voxels: ~10 GB at the default).
# 2**29 = 512 x 512 x 2048: the largest real chest CTs (512 x 512 x ~1,200 at 0.5 mm) with 1.7x margin.
MAX_VOXELS = 2 ** 29  # a record's 'max_voxels' overrides it (python data.py ... --max_voxels N)
CANONICAL = ('S', 'P', 'L')  # nibabel axis codes of (Z, H, W): inferior->superior, A->P, R->L
MIN_SIDE = 2         # pixels per axis below which a file is not an image; data.py checks >= 1 patch later
GRAY_TOL = 2         # grey levels: an RGB file whose channels agree this closely is a grey image (JPEG noise)
SPACING_TOL = 0.01   # relative spread of slice gaps accepted in a DICOM series (rounding in positions)
AIR_MAX_HU = -500    # every chest CT holds air (lungs, room): a minimum above this is not HU at all
MEDIAN_MIN_HU = -1050  # ... and its median sits above air: below, slope/intercept were applied twice
RADCHEST_AXES, RADCHEST_MM = ('I', 'P', 'L'), 0.8  # npz 'ct': superior->inferior, A->P, R->L; 0.8 mm


def _need(module):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f'reading real data needs {module.split(".")[0]}: pip install -r requirements-extra.txt') from e


def file_kind(path):
    """'picture', 'dicom' (by extension or the 'DICM' marker), 'nifti', 'series' (a folder) or 'unknown'."""
    p = path.lower()
    if os.path.isdir(path) or p.endswith(('.png', '.jpg', '.jpeg', '.nii', '.nii.gz')):
        return 'series' if os.path.isdir(path) else 'nifti' if p.endswith(('.nii', '.nii.gz')) else 'picture'
    with open(path, 'rb') as f:
        return 'dicom' if p.endswith('.dcm') or f.read(132)[128:] == b'DICM' else 'unknown'


def _within_budget(shape, rec, what='file'):
    """BadInput unless the declared shape is sane and holds at most the record's voxel budget (MAX_VOXELS)."""
    shape = tuple(int(s) for s in shape)
    budget = int(rec.get('max_voxels') or MAX_VOXELS)
    if any(s < 0 for s in shape):
        raise BadInput(f'{what} declares a negative size {shape}: corrupt header')
    if math.prod(shape) > budget:
        raise BadInput(f"{what} declares {' x '.join(map(str, shape))} = {math.prod(shape):,} voxels, over the "
                       f"budget of {budget:,}: refused before reading its pixels (a memory bomb or a corrupt header?); "
                       f"if it is real, raise the budget with python data.py ... --max_voxels N")
    return shape


def _usable(rec):
    """The record's path, once it exists and is not empty; the record's own error first."""
    path = rec['path']
    if rec.get('error'):
        raise BadInput(rec['error'])
    if not os.path.exists(path):
        raise BadInput('file not found')
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise BadInput('zero-byte file')
    return path


def _image(a, ndim):
    a = np.asarray(a)
    if a.ndim != ndim:
        raise BadInput(f'shape {a.shape}: expected one {ndim}D image')
    if min(a.shape) < MIN_SIDE:
        raise BadInput(f'shape {a.shape}: fewer than {MIN_SIDE} pixels along an axis (1-pixel image?)')
    bad = int(np.size(a) - np.isfinite(a).sum())
    if bad:
        raise BadInput(f'{bad} NaN or inf values')
    return np.ascontiguousarray(a, np.float32)


def _read_picture(path, rec):
    Image = _need('PIL.Image')
    try:
        with Image.open(path) as im:  # header only: PIL refuses > 2 x Image.MAX_IMAGE_PIXELS itself (bomb guard)
            _within_budget((im.height, im.width, len(im.getbands())), rec, 'image')
            im.load()  # decode now: a truncated file fails here, not later in a worker
            im = im.getchannel(0) if im.mode == 'LA' else im
            a = np.asarray(im if im.mode in ('1', 'L', 'F') or im.mode.startswith('I') else im.convert('RGB'))
    except BadInput:
        raise
    except (OSError, SyntaxError, ValueError) as e:  # Pillow's corrupt/truncated/unidentified errors
        raise BadInput(f'corrupt or truncated image ({e})') from None
    except Image.DecompressionBombError as e:  # not a ValueError: its own reason, not "unexpected"
        raise BadInput(f'image refused by Pillow as a decompression bomb ({e})') from None
    if a.ndim == 3:  # refuse colour: a radiograph with colour is a screenshot or carries overlays
        if (a.max(-1).astype(np.int32) - a.min(-1)).max() > GRAY_TOL:
            raise BadInput('RGB colour image: radiographs are grayscale (screenshot or overlay?)')
        a = a.mean(-1)  # a grey image saved as RGB (many exports): keep it
    return a


def _dicom_header(path):
    """The DICOM dataset without its pixel data (nothing large is read)."""
    pydicom = _need('pydicom')
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as e:  # pydicom raises many types for a damaged file
        raise BadInput(f'unreadable DICOM ({type(e).__name__}: {e})') from None


def _dicom_shape(ds):
    """(frames, rows, columns, samples) as the header declares them: what pixel_array would allocate."""
    try:
        return tuple(int(ds.get(k) or 1) for k in ('NumberOfFrames', 'Rows', 'Columns', 'SamplesPerPixel'))
    except (TypeError, ValueError) as e:
        raise BadInput(f'unreadable DICOM image size ({e})') from None


def _read_dicom(path, rec):
    """(dataset, pixels float32 after RescaleSlope/Intercept); colour is refused (DX/CR/CT are MONOCHROME)."""
    pydicom = _need('pydicom')
    _within_budget(_dicom_shape(_dicom_header(path)), rec, 'DICOM')  # a small compressed file can declare 64k x 64k
    try:
        ds = pydicom.dcmread(path)
    except Exception as e:  # pydicom raises many types for a damaged file
        raise BadInput(f'unreadable DICOM ({type(e).__name__}: {e})') from None
    if not any(k in ds for k in ('PixelData', 'FloatPixelData', 'DoubleFloatPixelData')):
        raise BadInput('DICOM without pixel data (a report, presentation state or key object?)')
    if int(ds.get('SamplesPerPixel', 1)) != 1:
        raise BadInput(f'RGB colour DICOM ({ds.get("PhotometricInterpretation")}): X-ray and CT are grayscale')
    try:  # uncompressed pixels: their byte count is fixed by the header, and pydicom reads a header that lies
        raw = 'PixelData' in ds and not ds.file_meta.TransferSyntaxUID.is_compressed  # small as extra frames
    except Exception:  # no file meta, or a transfer syntax pydicom does not know: pixel_array decides below
        raw = False
    if raw:
        frames, rows, cols, _ = _dicom_shape(ds)
        want = math.ceil(frames * rows * cols * int(ds.get('BitsAllocated') or 0) / 8)
        if len(ds.PixelData) not in (want, want + 1):  # + 1: the pad byte of an odd length
            raise BadInput(f'DICOM pixel data holds {len(ds.PixelData)} bytes, its header declares {frames} x {rows} x '
                           f'{cols} at {ds.get("BitsAllocated")} bits ({want} bytes): a corrupt header or a cut file')
    try:
        a = ds.pixel_array
    except Exception as e:
        raise BadInput(f'cannot decode DICOM pixels ({e}); compressed ones may need pylibjpeg or gdcm') from None
    if a.ndim != 2:
        raise BadInput(f'multi-frame DICOM, shape {a.shape}: not supported, one slice per file')
    slope, inter = ds.get('RescaleSlope'), ds.get('RescaleIntercept')  # modality LUT: stored -> HU
    return ds, a.astype(np.float32) * float(1 if slope is None else slope) + float(inter or 0)


def load_xray(rec):
    """Raw radiograph (H, W) float32 from PNG/JPG or DICOM, bright = dense (MONOCHROME1 inverted)."""
    path = _usable(rec)
    kind = file_kind(path)
    if kind == 'picture':
        return _image(_read_picture(path, rec), 2)
    if kind != 'dicom':
        raise BadInput(f'unknown file type for a radiograph ({os.path.basename(path)}): expected '
                       '.png, .jpg, .jpeg or DICOM')
    ds, a = _read_dicom(path, rec)
    a = _image(a, 2)
    return a.max() + a.min() - a if ds.get('PhotometricInterpretation') == 'MONOCHROME1' else a


def _axes_matrix(codes, spacing):
    """3x3 matrix from axis codes: column k = RAS direction of array axis k times its spacing."""
    unit = {'R': (1, 0, 0), 'L': (-1, 0, 0), 'A': (0, 1, 0), 'P': (0, -1, 0), 'S': (0, 0, 1), 'I': (0, 0, -1)}
    return np.array([unit[c] for c in codes], float).T * np.asarray(spacing, float)


def _reorient(a, m):
    """A 3D array of axes m (RAS) flipped/transposed to CANONICAL, with its spacing; oblique ones snap."""
    ornt = _need('nibabel.orientations')
    try:  # io_orientation reads the 3x3 part of an affine: m padded to 4x4
        t = ornt.ornt_transform(ornt.io_orientation(np.pad(m, (0, 1))), ornt.axcodes2ornt(CANONICAL))
    except ValueError as e:
        raise BadInput(f'degenerate orientation matrix ({e})') from None
    size = np.sqrt((m ** 2).sum(0))  # mm per step of each source axis, which t[:, 0] sends to its destination
    spacing = tuple(float(s) for s in size[np.argsort(t[:, 0])])
    return np.ascontiguousarray(ornt.apply_orientation(a, t), np.float32), spacing


def _volume(a, m):
    """Checked canonical (hu, spacing_zyx): no air means never rescaled, a median below air rescaled twice."""
    hu, spacing = _reorient(_image(a, 3), m)
    if hu.min() > AIR_MAX_HU:
        raise BadInput(f'not in HU: no air (minimum {hu.min():.0f} > {AIR_MAX_HU}); slope/intercept missing?')
    median = float(np.median(hu[::4, ::4, ::4]))  # a subsample is plenty for this test
    if median < MEDIAN_MIN_HU:
        raise BadInput(f'not in HU: median {median:.0f} < {MEDIAN_MIN_HU}; slope/intercept applied twice?')
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        raise BadInput(f'voxel spacing {spacing} mm is not positive')
    return hu, spacing


def _nifti_size_matches(path, proxy):
    """BadInput unless the file holds exactly the bytes its header declares: nibabel reads the declared shape from
    the start of the data, so a header that lies small (or a wrong vox_offset or datatype) would load silently as
    another image. A .nii.gz is measured by its gzip trailer (ISIZE, the size mod 2**32; 0 in multi-member files)."""
    try:
        declared = int(proxy.offset) + math.prod(proxy.shape) * proxy.dtype.itemsize  # what nibabel will read
    except Exception as e:  # an unknown datatype code, an offset nibabel cannot read
        raise BadInput(f'corrupt NIfTI header ({type(e).__name__}: {e})') from None
    with open(path, 'rb') as f:
        if path.lower().endswith('.gz'):
            f.seek(-4, os.SEEK_END)
            held, declared = int.from_bytes(f.read(4), 'little'), declared % 2 ** 32
            if held == 0:
                return
        else:
            held = f.seek(0, os.SEEK_END)
    if held != declared:
        raise BadInput(f'NIfTI header declares {proxy.shape} {proxy.dtype} voxels, {declared} bytes '
                       f'with the header, but the file holds {held}: truncated, or a corrupt header')


def _read_nifti(path, rec):
    """(array, axes matrix): the record's scaling and geometry (original CT-RATE), else the header's."""
    nib = _need('nibabel')
    try:
        img = nib.load(path)  # the header only: the pixels are read below
    except Exception as e:
        raise BadInput(f'corrupt or truncated NIfTI ({type(e).__name__}: {e})') from None
    _within_budget(img.header.get_data_shape(), rec, 'NIfTI')
    _nifti_size_matches(path, img.dataobj)
    try:
        a = (np.asarray(img.dataobj.get_unscaled(), np.float32) * rec['slope'] + rec['intercept']
             if 'slope' in rec else img.get_fdata(dtype=np.float32))
    except Exception as e:  # gzip/zlib/EOF/header errors of a damaged file
        raise BadInput(f'corrupt or truncated NIfTI ({type(e).__name__}: {e})') from None
    while a.ndim > 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if 'axes' in rec:
        return a, _axes_matrix(rec['axes'], rec['spacing_xyz'])
    if img.header['qform_code'] > 0 or img.header['sform_code'] > 0:
        return a, img.affine[:3, :3]
    raise BadInput('NIfTI without orientation (qform_code = sform_code = 0): left and right are unknown')


def _read_series(folder, rec):
    """A folder's DICOM series -> (HU (Z, rows, cols), axes matrix), slices sorted by position along the normal."""
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if file_kind(os.path.join(folder, f)) == 'dicom')
    shapes = []
    for f in files:  # headers only: the series' size is known before any pixel is decoded
        try:
            shapes.append(_dicom_shape(_dicom_header(_usable({'path': f}))))
        except BadInput as e:
            raise BadInput(f'slice {os.path.basename(f)}: {e}') from None
    if shapes:  # (files, frames, rows, columns, samples) of its largest file: an upper bound on the volume
        _within_budget((len(files),) + max(shapes, key=math.prod), rec, 'DICOM series')
    slices = []
    for f in files:
        try:
            slices.append(_read_dicom(_usable({'path': f}), rec))
        except BadInput as e:
            raise BadInput(f'slice {os.path.basename(f)}: {e}') from None
    if len(slices) < MIN_SIDE:
        raise BadInput(f'{len(slices)} DICOM slice in the folder: not a volume')
    if len({str(ds.get('SeriesInstanceUID')) for ds, _ in slices}) > 1:
        raise BadInput('several series (SeriesInstanceUID) in one folder: give each its own folder')
    try:
        iop = np.array([[float(v) for v in ds.ImageOrientationPatient] for ds, _ in slices])
        ipp = np.array([[float(v) for v in ds.ImagePositionPatient] for ds, _ in slices])
        dr, dc = (float(v) for v in slices[0][0].PixelSpacing)  # between rows, between columns
    except (AttributeError, TypeError, ValueError) as e:
        raise BadInput(f'DICOM series without usable geometry ({e})') from None
    if np.ptp(iop, 0).max() > 1e-3 or len({a.shape for _, a in slices}) > 1:
        raise BadInput('slices of different orientation or size in one series')
    row, col = iop[0, :3], iop[0, 3:]  # LPS directions of increasing column index and row index
    normal = np.cross(row, col)
    pos = ipp @ normal
    order = np.argsort(pos)
    gaps = np.diff(pos[order])
    if gaps.min() <= 0 or np.ptp(gaps) > SPACING_TOL * np.median(gaps):
        raise BadInput(f'mismatched slice spacing: gaps {gaps.min():.3g} to {gaps.max():.3g} mm '
                       '(missing, duplicate or mixed slices)')
    lps = np.stack([normal * np.median(gaps), col * dr, row * dc], 1)  # columns: slice, row, col axes
    return np.stack([slices[i][1] for i in order]), lps * np.array([[-1], [-1], [1]])  # LPS -> RAS


def load_ct(rec):
    """Raw CT (hu (Z, H, W) canonical, spacing_zyx mm) from a NIfTI file or a folder of DICOM slices."""
    path = _usable(rec)
    kind = file_kind(path)
    if kind not in ('nifti', 'series'):
        raise BadInput(f'unknown file type for CT ({os.path.basename(path)}): expected .nii, .nii.gz '
                       'or a folder of DICOM slices')
    return _volume(*(_read_nifti(path, rec) if kind == 'nifti' else _read_series(path, rec)))


def load_radchest(rec):
    """Raw RAD-ChestCT volume: npz key 'ct', int16 HU clipped to [-1000, 1000], 0.8 mm isotropic."""
    path = _usable(rec)
    try:
        with np.load(path) as z:
            with z.zip.open('ct.npy') as f:  # the member's npy header: its shape, before the array is read
                version = np.lib.format.read_magic(f)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
                shape = read_header[version](f)[0] if version in read_header else ()  # 3.0 (utf-8 names): rare
            _within_budget(shape, rec, 'npz array "ct"')
            a = z['ct']
    except BadInput:
        raise
    except Exception as e:  # not a zip, truncated, no 'ct' key
        raise BadInput(f'corrupt RAD-ChestCT npz, expected key "ct" ({type(e).__name__}: {e})') from None
    return _volume(a, _axes_matrix(RADCHEST_AXES, (RADCHEST_MM,) * 3))


def load_folder(rec):
    """`python data.py folder`: a radiograph or a CT, by the record's modality."""
    return load_xray(rec) if rec['modality'] == '2d' else load_ct(rec)
