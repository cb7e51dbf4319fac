"""
Raw formats (paper 2.4.1), the lowest layer: the label schema LABELS, BadInput, and per data set (or any
folder of radiographs or CT) records and a raw loader for data.preprocess_records (python data.py <name>).
Layouts, labels, canonical orientation, refused inputs and pitfalls: DATA.md, "Real data".

    records_<name>(root, ...) -> dicts: id, patient_id, study_id, split, labels (float32[5] in LABELS
        order, NaN unknown), modality ('2d'|'3d'), path (+ loader keys; an 'error' key fails it on load)
    load_xray(rec) -> (H, W) float32, bright = dense; load_ct(rec), load_radchest(rec) -> (hu (Z, H, W)
        float32, spacing_zyx mm) with Z inferior -> superior, H anterior -> posterior, W right -> left
Anything unusable raises BadInput(reason). Pillow, pydicom and nibabel are optional, imported where used.
"""

import csv
import glob
import gzip
import hashlib
import importlib
import os
import re

import numpy as np

LABELS = ('ATEL', 'CARD', 'CONS', 'LO', 'EFF')  # Atelectasis, Cardiomegaly, Consolidation, Lung Opacity, Pleural Effusion


class BadInput(ValueError):
    """An input that cannot become a sample (corrupt, NaN, constant, too small, ...); the message says why."""


CANONICAL = ('S', 'P', 'L')  # nibabel axis codes of (Z, H, W): inferior->superior, A->P, R->L
MIN_SIDE = 2         # pixels per axis below which a file is not an image; data.py checks >= 1 patch later
GRAY_TOL = 2         # grey levels: an RGB file whose channels agree this closely is a grey image (JPEG noise)
SPACING_TOL = 0.01   # relative spread of slice gaps accepted in a DICOM series (rounding in positions)
AIR_MAX_HU = -500    # every chest CT holds air (lungs, room): a minimum above this is not HU at all
MEDIAN_MIN_HU = -1050  # ... and its median sits above air: below, slope/intercept were applied twice
VAL_FRAC, TEST_FRAC = 0.05, 0.1  # patient shares hashed into val/test where a data set has no such split
SPLITS = {'train': 'train', 'validate': 'val', 'valid': 'val', 'validation': 'val', 'val': 'val',
          'test': 'test'}

# label columns in LABELS order (case-insensitive; tuples are alternative spellings)
CHEXPERT_COLS = ('Atelectasis', 'Cardiomegaly', 'Consolidation', ('Lung Opacity', 'Airspace Opacity'),
                 'Pleural Effusion')  # MIMIC-CXR-JPG and CheXpert; CheXlocalize says "Airspace Opacity"
CTRATE_COLS = ('Atelectasis', 'Cardiomegaly', 'Consolidation', 'Lung opacity', 'Pleural effusion')
FOLDER_COLS = tuple(zip(LABELS, ('Atelectasis', 'Cardiomegaly', 'Consolidation', 'Lung Opacity',
                                 'Pleural Effusion')))
MIMIC_VIEWS = {'PA': 0, 'AP': 1}  # frontal views, PA preferred (standing, less magnified than portable AP)
CTRATE_AXES = ('L', 'P', 'S')  # original CT-RATE arrays (x, y, z): CT-CLIP trains on them as SLP [U]
RADCHEST_TOKENS = ('atelectasis', 'cardiomegaly', 'consolidation', 'opacity', 'pleural_effusion')
RADCHEST_AXES, RADCHEST_MM = ('I', 'P', 'L'), 0.8  # npz 'ct': superior->inferior, A->P, R->L; 0.8 mm
RADCHEST_SPLITS = {'trn': 'train', 'val': 'val', 'tst': 'test'}
EXTRAS = 'pip install -r requirements-extra.txt'


def _need(module):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f'reading real data needs {module.split(".")[0]}: {EXTRAS}') from e


# ----------------------------------------------------------------------------- CSVs, labels, splits

def _read_csv(path):
    with (gzip.open if path.endswith('.gz') else open)(path, 'rt', newline='', encoding='utf-8-sig') as f:
        reader = csv.DictReader(f)
        return reader.fieldnames or [], list(reader)


def _glob(root, pattern, required=False):
    """Matches in root and up to two folders down (a data set's CSVs sit near its top)."""
    hits = sorted(p for d in ('', '*', '*/*') for p in glob.glob(os.path.join(root, d, pattern)))
    if required and not hits:
        raise FileNotFoundError(f'{root}: no file matching {pattern}; see DATA.md "Real data" for the layout')
    return hits


def _one(root, pattern, required=True):
    hits = _glob(root, pattern, required)
    if len(hits) > 1:
        raise ValueError(f'{root}: several files match {pattern}: {hits}; keep one')
    return hits[0] if hits else None


def _columns(header, wanted, path, required=True):
    """Header names for `wanted` (each a name or a tuple of spellings), matched case-insensitively."""
    low, out = {h.strip().lower(): h for h in header}, []
    for alts in wanted:
        alts = (alts,) if isinstance(alts, str) else alts
        hit = next((low[a.lower()] for a in alts if a.lower() in low), None)
        if hit is None and required:
            raise ValueError(f'{path}: no column {" or ".join(map(repr, alts))}; header is {header}')
        out.append(hit)
    return out


def _value(v, blank, where):
    """CheXpert convention: 1, 0, -1 uncertain -> NaN (U-Ignore), blank (not mentioned) -> `blank`."""
    v = (v or '').strip()
    try:
        return blank if v == '' else np.nan if float(v) == -1 else float(v)
    except ValueError:
        raise ValueError(f'{where}: {v!r} is not 1, 0, -1 or blank') from None


def _labels(row, cols, blank, path):
    """float32[5] in LABELS order from the label columns; an absent column (None) -> NaN."""
    return np.array([np.nan if c is None else _value(row.get(c), blank, f'{path}, column {c!r}')
                     for c in cols], np.float32)


def _hash_split(key, val_frac, test_frac=0.0):
    """Patient-level split by md5 (not Python's salted hash): the same on every run."""
    u = int(hashlib.md5(key.encode()).hexdigest()[:8], 16) / 2 ** 32
    return 'test' if u < test_frac else 'val' if u < test_frac + val_frac else 'train'


def _record(id, patient_id, study_id, split, labels, modality, path, error=None, **extra):
    """A record; `error` makes its loader raise BadInput(error), so the report counts it."""
    rec = dict(id=str(id), patient_id=str(patient_id), study_id=str(study_id), split=split,
               labels=np.full(len(LABELS), np.nan, np.float32) if labels is None else labels,
               modality=modality, path=path, **extra)
    return dict(rec, error=error) if error else rec


# ----------------------------------------------------------------------------- data sets

def records_mimic(root, blank=0.0):
    """MIMIC-CXR-JPG 2.x: one frontal image per study (PA before AP), the official split, CheXpert labels;
    blank=0.0: a finding the report does not mention is absent (np.nan: unknown)."""
    meta, split, lab = (_one(root, f'*-{n}.csv*') for n in ('metadata', 'split', 'chexpert'))
    split_of = {r['dicom_id']: SPLITS.get(r['split'].strip()) for r in _read_csv(split)[1]}
    header, rows = _read_csv(lab)
    cols = _columns(header, CHEXPERT_COLS, lab)
    labels = {(r['subject_id'], r['study_id']): _labels(r, cols, blank, lab) for r in rows}
    best = {}  # (subject, study) -> (view rank, dicom_id): PA before AP, then the smallest dicom_id
    for r in _read_csv(meta)[1]:
        rank, key = MIMIC_VIEWS.get((r['ViewPosition'] or '').strip()), (r['subject_id'], r['study_id'])
        if rank is not None and (rank, r['dicom_id']) < best.get(key, (9, '')):
            best[key] = (rank, r['dicom_id'])
    recs = []
    for (sub, stu), (_, dicom) in sorted(best.items()):
        path = os.path.join(root, 'files', f'p{sub[:2]}', f'p{sub}', f's{stu}', f'{dicom}.jpg')
        sp, lab_row = split_of.get(dicom), labels.get((sub, stu))
        error = (f'dicom_id {dicom} has no row in {os.path.basename(split)}' if sp is None else
                 f'study {stu} has no row in {os.path.basename(lab)}' if lab_row is None else None)
        recs.append(_record(dicom, sub, stu, sp or 'train', lab_row, '2d', path, error=error))
    return recs


def records_chexpert(root):
    """CheXpert's radiologist-labelled sets in the CheXlocalize layout (test/, test_labels.csv, optionally
    val/, val_labels.csv): every frontal image (the paper's n=668 counts images)."""
    recs = []
    for name, split in (('test_labels.csv', 'test'), ('val_labels.csv', 'val')):
        path = os.path.join(root, name)
        if not os.path.exists(path) and split == 'val':
            continue
        header, rows = _read_csv(path)
        (pcol,), cols = _columns(header, ['Path'], path), _columns(header, CHEXPERT_COLS, path)
        for r in rows:
            rel = re.sub(r'^CheXpert-v1\.0(-small)?/', '', r[pcol].strip())
            rel = re.sub(r'^valid/', 'val/', rel)  # CheXlocalize names the folder val/, the CSV may not
            if '_lateral' in os.path.basename(rel):
                continue
            m = re.search(r'(patient\d+)/(study\d+)', rel)
            recs.append(_record(os.path.splitext(rel)[0], m[1], f'{m[1]}/{m[2]}', split,
                                _labels(r, cols, np.nan, path), '2d', os.path.join(root, rel)))
    return recs


def records_ctrate(root, val_frac=VAL_FRAC):
    """CT-RATE (root = its dataset/ folder): every volume of the label CSVs; train is split train/val by
    patient hash, valid is the test set. `{split}_fixed` folders are read by their headers; the original
    ones have placeholder headers, so HU scaling and spacing come from the metadata CSV, axes CTRATE_AXES."""
    _glob(root, '*_predicted_labels.csv', required=True)  # fail early, with the layout hint
    recs = []
    for folder, meta_csv, lab_csv in (('train', 'train_metadata.csv', 'train_predicted_labels.csv'),
                                      ('valid', 'validation_metadata.csv', 'valid_predicted_labels.csv')):
        lab = _one(root, lab_csv, required=False)
        if lab is None:
            continue
        fixed = os.path.isdir(os.path.join(root, folder + '_fixed'))
        meta = {} if fixed else {r['VolumeName'].strip(): r for r in _read_csv(_one(root, meta_csv))[1]}
        header, rows = _read_csv(lab)
        cols = _columns(header, CTRATE_COLS, lab)
        for r in rows:
            name = r['VolumeName'].strip()                 # train_12_a_2.nii.gz
            s, pid, scan = name.split('_')[:3]
            path = os.path.join(root, folder + '_fixed' * fixed, f'{s}_{pid}', f'{s}_{pid}_{scan}', name)
            split = 'test' if folder == 'valid' else _hash_split(f'{s}_{pid}', val_frac)
            rec = _record(name.split('.')[0], f'{s}_{pid}', f'{s}_{pid}_{scan}', split,
                          _labels(r, cols, np.nan, lab), '3d', path)
            m = meta.get(name)
            if not fixed and m is None:
                rec['error'] = f'{name} has no row in {meta_csv}: its slope and intercept are unknown'
            elif not fixed:
                y, x = (float(v) for v in re.findall(r'[-+0-9.eE]+', m['XYSpacing']))  # PixelSpacing: row, col
                rec.update(slope=float(m['RescaleSlope']), intercept=float(m['RescaleIntercept']),
                           axes=CTRATE_AXES, spacing_xyz=(x, y, float(m['ZSpacing'])))
            recs.append(rec)
    return recs


def records_radchest(root):
    """RAD-ChestCT (Zenodo 6406114): <NoteAcc_DEID>.npz anywhere under root, split by the trn/val/tst prefix,
    a finding the max over its `<token>*<location>` columns (whole tokens); patients from Summary_*.csv."""
    files = {os.path.basename(p)[:-4]: p for p in glob.glob(os.path.join(root, '**', '*.npz'), recursive=True)}
    summary = _one(root, 'Summary_*.csv', required=False)
    patient = {r['NoteAcc_DEID']: r['MRN_DEID'] for r in _read_csv(summary)[1]} if summary else {}
    recs = []
    for path in _glob(root, '*_Abnormality_and_Location_Labels.csv', required=True):
        header, rows = _read_csv(path)
        groups = [[c for c in header if c.split('*')[0] == t] for t in RADCHEST_TOKENS]
        if not all(groups):
            raise ValueError(f'{path}: no <token>*<location> columns for {RADCHEST_TOKENS}')
        for r in rows:
            vid = r['NoteAcc_DEID'].strip()
            lab = np.array([np.fmax.reduce([_value(r[c], np.nan, path) for c in g]) for g in groups],
                           np.float32)  # fmax: NaN only where every location is blank
            split = RADCHEST_SPLITS.get(vid[:3])
            recs.append(_record(vid, patient.get(vid, vid), vid, split or 'test', lab, '3d',
                                files.get(vid, os.path.join(root, vid + '.npz')),
                                error=None if split else f'{vid}: prefix not trn/val/tst, split unknown'))
    return recs


def records_folder(root, modality='xray', labels=None, val_frac=VAL_FRAC, test_frac=TEST_FRAC):
    """Any folder: xray, every file a radiograph; ct, every NIfTI file and every folder of DICOM files a
    volume (other files fail as 'unknown file type'). Optional labels CSV: `path` (relative to root), label
    columns, `patient_id`, `split`; without it each file is its own patient, split by hash."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f'--root {root} is not a folder')
    two_d, items = modality == 'xray', []
    skip = os.path.abspath(labels) if labels else None
    for d, dirs, files in os.walk(root):
        dirs.sort()
        files = [os.path.join(d, f) for f in sorted(files) if os.path.abspath(os.path.join(d, f)) != skip]
        series = [] if two_d else [f for f in files if _kind(f) == 'dicom']
        items += ([d] if series else []) + [f for f in files if f not in series]
    rel = {os.path.relpath(p, root).replace(os.sep, '/'): p for p in items}
    table, cols, pat, spl = {}, None, None, None
    if labels:
        header, rows = _read_csv(labels)
        (pcol,), cols = _columns(header, ['path'], labels), _columns(header, FOLDER_COLS, labels, False)
        pat, spl = _columns(header, ['patient_id', 'split'], labels, required=False)
        table = {os.path.normpath(r[pcol].strip()).replace(os.sep, '/'): r for r in rows}
    recs = []
    for key in sorted(set(rel) | set(table)):
        r = table.get(key, {})
        pid = ((r.get(pat) or '').strip() if pat else '') or key
        split = SPLITS.get((r.get(spl) or '').strip().lower()) if spl else None
        error = (None if not labels else f'no row for {key} in {labels}' if key not in table else
                 None if key in rel else f'{key} is listed in {labels} but not found under {root}')
        recs.append(_record(key, pid, key, split or _hash_split(pid, val_frac, test_frac),
                            _labels(r, cols, np.nan, labels) if r else None, '2d' if two_d else '3d',
                            rel.get(key, os.path.join(root, key)), error=error))
    return recs


# ----------------------------------------------------------------------------- raw loaders

def _kind(path):
    """'picture', 'dicom' (by extension or the 'DICM' marker), 'nifti', 'series' (a folder) or 'unknown'."""
    p = path.lower()
    if os.path.isdir(path) or p.endswith(('.png', '.jpg', '.jpeg', '.nii', '.nii.gz')):
        return 'series' if os.path.isdir(path) else 'nifti' if p.endswith(('.nii', '.nii.gz')) else 'picture'
    with open(path, 'rb') as f:
        return 'dicom' if p.endswith('.dcm') or f.read(132)[128:] == b'DICM' else 'unknown'


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


def _read_picture(path):
    Image = _need('PIL.Image')
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not later in a worker
            im = im.getchannel(0) if im.mode == 'LA' else im
            a = np.asarray(im if im.mode in ('1', 'L', 'F') or im.mode.startswith('I') else im.convert('RGB'))
    except (OSError, SyntaxError, ValueError) as e:  # Pillow's corrupt/truncated/unidentified errors
        raise BadInput(f'corrupt or truncated image ({e})') from None
    if a.ndim == 3:  # refuse colour: a radiograph with colour is a screenshot or carries overlays
        if (a.max(-1).astype(np.int32) - a.min(-1)).max() > GRAY_TOL:
            raise BadInput('RGB colour image: radiographs are grayscale (screenshot or overlay?)')
        a = a.mean(-1)  # a grey image saved as RGB (many exports): keep it
    return a


def _read_dicom(path):
    """(dataset, pixels float32 after RescaleSlope/Intercept); colour is refused (DX/CR/CT are MONOCHROME)."""
    pydicom = _need('pydicom')
    try:
        ds = pydicom.dcmread(path)
    except Exception as e:  # pydicom raises many types for a damaged file
        raise BadInput(f'unreadable DICOM ({type(e).__name__}: {e})') from None
    if not any(k in ds for k in ('PixelData', 'FloatPixelData', 'DoubleFloatPixelData')):
        raise BadInput('DICOM without pixel data (a report, presentation state or key object?)')
    if int(ds.get('SamplesPerPixel', 1)) != 1:
        raise BadInput(f'RGB colour DICOM ({ds.get("PhotometricInterpretation")}): X-ray and CT are grayscale')
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
    kind = _kind(path)
    if kind == 'picture':
        return _image(_read_picture(path), 2)
    if kind != 'dicom':
        raise BadInput(f'unknown file type for a radiograph ({os.path.basename(path)}): expected '
                       '.png, .jpg, .jpeg or DICOM')
    ds, a = _read_dicom(path)
    a = _image(a, 2)
    return a.max() + a.min() - a if ds.get('PhotometricInterpretation') == 'MONOCHROME1' else a


def _axes_matrix(codes, spacing):
    """3x3 matrix from axis codes: column k = RAS direction of array axis k times its spacing."""
    unit = {'R': (1, 0, 0), 'L': (-1, 0, 0), 'A': (0, 1, 0), 'P': (0, -1, 0), 'S': (0, 0, 1), 'I': (0, 0, -1)}
    return np.array([unit[c] for c in codes], float).T * np.asarray(spacing, float)


def _reorient(a, m):
    """Flip/transpose a 3D array with axes m (RAS, as _axes_matrix) to the CANONICAL (Z, H, W), and its
    spacing with it. Oblique axes snap to the nearest one (no resampling)."""
    ornt = _need('nibabel.orientations')
    aff = np.eye(4)
    aff[:3, :3] = m
    try:
        t = ornt.ornt_transform(ornt.io_orientation(aff), ornt.axcodes2ornt(CANONICAL))
    except ValueError as e:
        raise BadInput(f'degenerate orientation matrix ({e})') from None
    size, spacing = np.sqrt((m ** 2).sum(0)), [0.0] * 3
    for src, (dst, _) in enumerate(t):  # t[src] = (destination axis, flip)
        spacing[int(dst)] = float(size[src])
    return np.ascontiguousarray(ornt.apply_orientation(a, t), np.float32), tuple(spacing)


def _volume(a, m):
    """Checked, canonical (hu (Z, H, W), spacing_zyx); the HU test catches values never rescaled (no air)
    and slope/intercept applied twice (median below air)."""
    hu, spacing = _reorient(_image(a, 3), m)
    if hu.min() > AIR_MAX_HU:
        raise BadInput(f'not in HU: no air (minimum {hu.min():.0f} > {AIR_MAX_HU}); slope/intercept missing?')
    median = float(np.median(hu[::4, ::4, ::4]))  # a subsample is plenty for this test
    if median < MEDIAN_MIN_HU:
        raise BadInput(f'not in HU: median {median:.0f} < {MEDIAN_MIN_HU}; slope/intercept applied twice?')
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        raise BadInput(f'voxel spacing {spacing} mm is not positive')
    return hu, spacing


def _read_nifti(path, rec):
    """(array, axes matrix): the record's scaling and geometry (original CT-RATE) if it has them, else the
    header's (scl_slope/scl_inter through get_fdata, so HU once, never twice; the qform/sform affine)."""
    nib = _need('nibabel')
    try:
        img = nib.load(path)
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


def _read_series(folder):
    """One DICOM series per folder -> ((Z, rows, cols) HU, axes matrix), slices sorted by ImagePositionPatient
    along the slice normal (InstanceNumber and file names are not reliable)."""
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if _kind(os.path.join(folder, f)) == 'dicom')
    slices = []
    for f in files:
        try:
            slices.append(_read_dicom(_usable({'path': f})))
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
    kind = _kind(path)
    if kind not in ('nifti', 'series'):
        raise BadInput(f'unknown file type for CT ({os.path.basename(path)}): expected .nii, .nii.gz '
                       'or a folder of DICOM slices')
    return _volume(*(_read_nifti(path, rec) if kind == 'nifti' else _read_series(path)))


def load_radchest(rec):
    """Raw RAD-ChestCT volume: npz key 'ct', int16 HU clipped to [-1000, 1000], 0.8 mm isotropic."""
    path = _usable(rec)
    try:
        with np.load(path) as z:
            a = z['ct']
    except Exception as e:  # not a zip, truncated, no 'ct' key
        raise BadInput(f'corrupt RAD-ChestCT npz, expected key "ct" ({type(e).__name__}: {e})') from None
    return _volume(a, _axes_matrix(RADCHEST_AXES, (RADCHEST_MM,) * 3))


def load_folder(rec):
    """`python data.py folder`: a radiograph or a CT, by the record's modality."""
    return load_xray(rec) if rec['modality'] == '2d' else load_ct(rec)
