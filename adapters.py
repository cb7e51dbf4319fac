"""
Real data sets (paper 2.4.1): the label schema LABELS, and for each data set (or any folder of radiographs
or CT) its records: dicts of id, patient_id, study_id, split, labels (float32[5] in LABELS order, NaN
unknown), modality ('2d'|'3d'), path and loader keys (an 'error' makes the loader refuse it), which
`python data.py <name>` loads with readers.py. DATASETS, at the end, is the one registry of the data sets: adding
one is a records_* function and a line there (and a loader in readers.py for a new format). Layouts, labels,
splits, pitfalls: DATA.md, "Real data".
"""

import csv
import glob
import gzip
import hashlib
import os
import re

import numpy as np

import readers

LABELS = ('ATEL', 'CARD', 'CONS', 'LO', 'EFF')  # Atelectasis, Cardiomegaly, Consolidation, Lung Opacity, Pleural Effusion
VAL_FRAC, TEST_FRAC = 0.05, 0.1  # patient shares hashed into val/test where a data set has no such split
SPLITS = {'train': 'train', 'validate': 'val', 'valid': 'val', 'validation': 'val', 'val': 'val', 'test': 'test'}

# label columns in LABELS order (case-insensitive; tuples are alternative spellings)
CHEXPERT_COLS = ('Atelectasis', 'Cardiomegaly', 'Consolidation', ('Lung Opacity', 'Airspace Opacity'),
                 'Pleural Effusion')  # MIMIC-CXR-JPG and CheXpert; CheXlocalize says "Airspace Opacity"
CTRATE_COLS = ('Atelectasis', 'Cardiomegaly', 'Consolidation', 'Lung opacity', 'Pleural effusion')
FOLDER_COLS = tuple(zip(LABELS, ('Atelectasis', 'Cardiomegaly', 'Consolidation', 'Lung Opacity', 'Pleural Effusion')))
MIMIC_VIEWS = {'PA': 0, 'AP': 1}  # frontal views, PA preferred (standing, less magnified than portable AP)
CTRATE_AXES = ('L', 'P', 'S')  # original CT-RATE arrays (x, y, z): CT-CLIP trains on them as SLP [U]
RADCHEST_TOKENS = ('atelectasis', 'cardiomegaly', 'consolidation', 'opacity', 'pleural_effusion')
RADCHEST_SPLITS = {'trn': 'train', 'val': 'val', 'tst': 'test'}


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
    rec = dict(id=str(id), patient_id=str(patient_id), study_id=str(study_id), split=split, modality=modality,
               labels=np.full(len(LABELS), np.nan, np.float32) if labels is None else labels, path=path, **extra)
    return dict(rec, error=error) if error else rec


# ----------------------------------------------------------------------------- data sets

def records_mimic(root, blank=0.0):
    """MIMIC-CXR-JPG 2.x: a frontal image per study (PA first), the official split; blank: an unmentioned finding
    (0.0 or 'zero': negative; NaN or 'nan': unknown)."""
    blank = {'zero': 0.0, 'nan': np.nan}.get(blank, blank)
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
    """CheXpert's radiologist-labelled test (and val) sets, CheXlocalize layout: every frontal image."""
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
    """CT-RATE's dataset/ folder: train split by patient hash, valid the test set (headers: DATA.md, pitfalls)."""
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
    """RAD-ChestCT: <NoteAcc_DEID>.npz under root, split by prefix, a finding the max over its locations."""
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
    """Any folder of radiographs (xray) or of NIfTI files and DICOM series (ct), with an optional labels CSV."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f'--root {root} is not a folder')
    two_d, items = modality == 'xray', []
    skip = os.path.abspath(labels) if labels else None
    for d, dirs, files in os.walk(root):
        dirs.sort()
        files = [os.path.join(d, f) for f in sorted(files) if os.path.abspath(os.path.join(d, f)) != skip]
        series = [] if two_d else [f for f in files if readers.file_kind(f) == 'dicom']
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


# ----------------------------------------------------------------------------- the registry

# python data.py <name> --root R --out O [--option V ...]: each data set's records function, the raw loader of
# readers.py that reads its records, and the command-line options it takes (passed to it by keyword, by name)
DATASETS = {
    'mimic': (records_mimic, readers.load_xray, ('blank',)),
    'chexpert': (records_chexpert, readers.load_xray, ()),
    'ctrate': (records_ctrate, readers.load_ct, ('val_frac',)),
    'radchest': (records_radchest, readers.load_radchest, ()),
    'folder': (records_folder, readers.load_folder, ('modality', 'labels', 'val_frac', 'test_frac')),
}
OPTIONS = {  # argparse keywords of each option; its help names the data sets that take it
    'modality': dict(choices=('xray', 'ct'), default='xray', help='radiographs or CT'),
    'labels': dict(default=None, help='CSV with a path column and label columns'),
    'blank': dict(choices=('zero', 'nan'), default='zero',
                  help='a CheXpert label left blank (not mentioned) is negative or unknown'),
    'val_frac': dict(type=float, default=VAL_FRAC, help='patients hashed to val'),
    'test_frac': dict(type=float, default=TEST_FRAC, help='patients hashed to test'),
}
