"""
The phantom chest world: a labelled synthetic 2D + 3D data set that needs no download (DATA.md, "The phantom
world"; its calibration: RESULTS.md). Records and raw images only; data.make_phantom sends them through the
real-data path into shards (python data.py phantom --out data/phantom; the scripts do it on first use).

    records(seed, n2d, n3d)  -> one cheap dict per sample: ids, split, labels, a per-sample seed
    load(record)             -> the RAW image, synthesised from the record alone (pure, picklable)
        3d: volume(rng, findings)            -> HU volume (Z, H, W) + spacing, like a CT scan
        2d: drr(volume(rng, findings, DRR))  -> a radiograph projected through ANOTHER phantom patient
"""

import os

import numpy as np
from scipy import ndimage  # scipy comes with scikit-learn

from adapters import LABELS  # ('ATEL', 'CARD', 'CONS', 'LO', 'EFF')

VERSION = 3  # bump when the generator changes: data.make_phantom refuses to mix versions in one folder

# default sizes: test sets of >= 1000 2D and 500 3D samples give macro-AUROC standard errors ~0.02
N2D = (2400, 300, 1000)  # (train, val, test) radiographs
N3D = (800, 150, 500)    # (train, val, test) CT volumes
# Long sides are smaller than the paper's 224 / 112: this is the CPU quick-start world. With patch 14
# a whole radiograph is ~6x8 = 47 tokens and a CT ~4x3x5 = 53 (paper: ~256 and ~512), and a 3D sample
# stays ~190 KB on disk (int8), so the default world is ~310 MB. A lesion spans 1-3 patches.
LONG_SIDE_2D, LONG_SIDE_3D = 112, 70
NAN_FRACTION_2D = 0.03  # share of 2D labels hidden as unknown (NaN), as in CheXpert-labelled data

# label model: P(finding | parents); some correlation as in real chest imaging
P_CARD, P_CONS = 0.25, 0.22
P_EFF = (0.25, 0.45)   # given CARD = 0 / 1 (heart failure brings effusions)
P_ATEL = (0.20, 0.45)  # given EFF = 0 / 1 (compressive atelectasis)
P_LO = (0.25, 0.55)    # given CONS = 0 / 1 (a consolidation is also an opacity)

# Hounsfield units
AIR, LUNG, FAT, SOFT, LIVER, FLUID, DISC, SPONGY, CORTEX = -1000, -860, -100, 40, 55, 12, 80, 220, 650
NOISE_HU = (10.0, 16.0)  # per-patient noise sd: modest, as it is shared by every crop of a phantom
VESSEL = 500  # added to lung: a vessel thinner than a voxel, partial-volume averaged

# spacing (mm) of the raw volumes: 3D draws z in SPACING_3D_Z and x = y in SPACING_3D_XY per patient;
# DRR sources are coarse along the projection axis (y), which the projection sums away anyway
SPACING_3D_Z, SPACING_3D_XY = (2.5, 5.0), (3.8, 5.2)
SPACING_DRR_XZ, SPACING_DRR_Y = (3.0, 3.6), 7.0
# radiograph acquisition, per image: a tone curve (detector and vendor processing differ; min-max scaling
# removes a gain and an offset, not a gamma) and detector noise, both a share of the image's range
XRAY_GAMMA, XRAY_NOISE = (0.45, 2.2), (0.005, 0.03)

# finding strengths: the calibration knobs (DATA.md, "The phantom world")
CARD_SCALE = (0.12, 0.32)   # cardiomegaly multiplies heart size by 1 + U(a, b); normal ~ N(1, HEART_SD)
HEART_SD, HEART_SHAPE_SD = 0.06, 0.08  # normal size; independent per-axis shape factors
EFF_HEIGHT = (8.0, 32.0)    # fluid depth on the hemidiaphragm (posterior-lateral), mm
DEPENDENT_HU = (0.0, 150.0)  # unlabelled posterior-basal density (supine), peak HU added
ATEL_LIFT = (8.0, 28.0)     # hemidiaphragm elevation from volume loss, mm
ATEL_BAND = (10.0, 18.0), (40.0, 70.0), (-150.0, 10.0)  # plate thickness, radius (mm), HU
CONS_RADIUS, CONS_HU = (35.0, 60.0), (-120.0, 30.0)
LO_RADIUS, LO_HU = (60.0, 100.0), (350.0, 550.0)  # ground glass: HU added to lung, peak


# ----------------------------------------------------------------------------- labels and records

def draw_findings(rng, n):
    """(n, 5) uint8 true findings in LABELS order, with the correlations of the label model."""
    u = rng.random((n, 5))
    card, cons = u[:, 1] < P_CARD, u[:, 2] < P_CONS
    eff = u[:, 4] < np.where(card, P_EFF[1], P_EFF[0])
    atel = u[:, 0] < np.where(eff, P_ATEL[1], P_ATEL[0])
    lo = u[:, 3] < np.where(cons, P_LO[1], P_LO[0])
    return np.stack([atel, card, cons, lo, eff], 1).astype(np.uint8)


def records(seed=0, n2d=N2D, n3d=N3D):
    """Per-sample dicts, a pure function of seed: 'findings' the truth drawn, 'labels' what is stored (2D: some NaN)."""
    out = []
    for m, (modality, counts) in enumerate((('2d', n2d), ('3d', n3d))):
        for s, (split, n) in enumerate(zip(('train', 'val', 'test'), counts)):
            rng = np.random.default_rng([seed, m, s])
            f = draw_findings(rng, n)
            labels = f.astype(np.float32)
            extra = [{}] * n
            if modality == '2d':
                labels[rng.random(labels.shape) < NAN_FRACTION_2D] = np.nan
                extra = [dict(spacing=(p, p)) for p in rng.uniform(*SPACING_DRR_XZ, n)]  # DRR pixel, mm
            for i in range(n):
                rid = f'phantom{modality}-{split}-{i:05d}'
                out.append(dict(id=rid, patient_id=rid, study_id=rid, split=split, modality=modality,
                                labels=labels[i], findings=f[i], seed=(seed, m, s, i), **extra[i]))
    return out


def load(record):
    """data.preprocess_records' load_fn: the raw image of one record, from its seed alone."""
    rng = np.random.default_rng(record['seed'])
    if record['modality'] == '3d':
        return volume(rng, record['findings'])
    p = record['spacing'][0]
    return expose(rng, drr(*volume(rng, record['findings'], spacing_zyx=(p, SPACING_DRR_Y, p))))


def write_files(folder, n2d=20, n3d=20, seed=0) -> list:
    """The first n2d radiographs as 16-bit PNG and n3d CT volumes as NIfTI (int16 HU, an affine in canonical
    orientation) of the world `seed` under folder/xray and folder/ct, as a user's folder would hold them: embed.py's
    benchmark and tests. Returns the records, each with the 'path' it was written to. Needs pillow and nibabel."""
    from PIL import Image
    import nibabel as nib
    recs = records(seed, (n2d, 0, 0), (n3d, 0, 0))
    for sub in ('xray', 'ct'):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    for r in recs:
        raw = load(r)
        if r['modality'] == '2d':  # any gain and offset: preprocessing min-max normalises them away
            r['path'] = os.path.join(folder, 'xray', f"{r['id']}.png")
            u16 = np.rint((raw - raw.min()) / (raw.max() - raw.min()) * 65535).astype(np.uint16)
            Image.fromarray(u16).save(r['path'])
        else:  # array axes (Z, H, W) = (S, P, L): RAS columns +z, -y, -x times the spacing
            hu, (sz, sy, sx) = raw
            r['path'] = os.path.join(folder, 'ct', f"{r['id']}.nii.gz")
            nib.save(nib.Nifti1Image(np.rint(hu).astype(np.int16), _affine_spl(sz, sy, sx)), r['path'])
    return recs


def _affine_spl(sz, sy, sx):
    """NIfTI affine of an array whose axes run superior, posterior, left (canonical) with these spacings (mm)."""
    a = np.zeros((4, 4))
    a[2, 0], a[1, 1], a[0, 2], a[3, 3] = sz, -sy, -sx, 1.0  # axis 0 -> +S, 1 -> -A (P), 2 -> -R (L)
    return a


# ----------------------------------------------------------------------------- the generator

def smooth_noise(rng, shape, cell):
    """Zero-mean Gaussian field, correlation ~cell voxels per axis: coarse white noise interpolated one axis at a
    time (plain gathers: no BLAS threads to fight the workers, far cheaper than blurring the volume)."""
    f = rng.standard_normal([max(2, int(np.ceil(n / c)) + 1) for n, c in zip(shape, cell)]).astype(np.float32)
    for axis, n in enumerate(shape):
        m = f.shape[axis]
        t = np.linspace(0, m - 1, n, dtype=np.float32)
        i0 = np.minimum(t.astype(int), m - 2)
        w = (t - i0).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(f.ndim)])
        f = np.take(f, i0, axis) * (1 - w) + np.take(f, i0 + 1, axis) * w
    return f * 1.5 ** (len(shape) / 2)  # interpolation keeps E[(1-t)^2 + t^2] = 2/3 of the variance per axis


def box(c, r, axes):
    """Index slices of the box c +- r (mm) on the grid axes (z, y, x 1-D mm coordinates)."""
    sl = []
    for ci, ri, a in zip(c, r, axes):
        d = a[1] - a[0]
        lo, hi = int(np.floor((ci - ri - a[0]) / d)), int(np.ceil((ci + ri - a[0]) / d)) + 1
        sl.append(slice(min(max(lo, 0), len(a)), min(max(hi, 0), len(a))))
    return tuple(sl)


def ellipsoid_q(c, r, axes, sl, rot):
    """q = sum_k ((rot (p - c))_k / r_k)^2 on the box sl of the grid: q < 1 inside the ellipsoid."""
    z, y, x = (a[s] - ci for a, s, ci in zip(axes, sl, c))
    z, y, x = z[:, None, None], y[None, :, None], x[None, None, :]
    return sum(((R[0] * z + R[1] * y + R[2] * x) / rk) ** 2 for R, rk in zip(rot, r))  # plain broadcasts, no BLAS


def volume(rng, findings, spacing_zyx=None):
    """(hu float32 (Z, H, W) canonical, spacing_zyx mm) of one phantom chest CT with these 0/1 findings."""
    f = dict(zip(LABELS, np.asarray(findings, dtype=float)))
    if np.shape(findings) != (5,) or any(v not in (0, 1) for v in f.values()):
        raise ValueError(f"phantom.volume: findings must be 5 values 0/1 in {LABELS} order, got {findings}")
    # separate streams: the anatomy, the noise and each finding; toggling one finding leaves the patient
    # and the other findings as they were (the tests compare such twins)
    anat, noise, *fr = (np.random.default_rng(s) for s in rng.integers(2 ** 63, size=7))
    fr = dict(zip(LABELS, fr))
    u = anat.uniform
    # --- patient: body size and shape, position, field of view, spacing (the geometric variation)
    bw = u(160, 170)              # half chest width: little anatomy that every crop of a phantom shares
    bd = bw * u(0.66, 0.70)       # half depth (anterior-posterior)
    fov_z = 295.0                 # a fixed field of view, 295 x 370 x 270 mm (z, x, y), as a fixed
    mx, my = 185.0 - bw, 135.0 - bd  # scan protocol gives: the air margins vary with the body
    ox, oy = u(-1, 1) * (mx - 4), u(-1, 1) * (my - 4)  # the patient is not centred on the table,
    dz = u(-25, 25)               # nor at the same place along it: findings move on a fixed pixel grid
    if spacing_zyx is None:
        sxy = u(*SPACING_3D_XY)
        spacing_zyx = (u(*SPACING_3D_Z), sxy, sxy)
    sz, sy, sx = spacing_zyx
    z = np.arange(int(fov_z / sz)) * sz + sz / 2                            # inferior -> superior
    y = np.arange(int(2 * (bd + my) / sy)) * sy - (bd + my) + sy / 2 + oy  # anterior -> posterior
    x = np.arange(int(2 * (bw + mx) / sx)) * sx - (bw + mx) + sx / 2 + ox  # patient right -> left
    axes, shape = (z, y, x), (len(z), len(y), len(x))
    z3, y2, x2 = z[:, None, None], y[:, None], x[None, :]
    rr = np.sqrt((x2 / bw) ** 2 + (y2 / bd) ** 2)  # (H, W) elliptic radius, 1 on the skin
    soft = SOFT + anat.normal(0, 3)                 # modest per-patient nuisance
    fat = u(6, 16) / bw
    # --- body wall, ribs, sternum, spine: in-plane masks extended along z
    hu = np.full(shape, AIR, np.float32)
    hu[:, rr < 1] = FAT
    hu[:, rr < 1 - fat] = soft
    rib_in = 1 - fat - u(10, 16) / bw              # inner surface of the rib cage
    ring = (rr >= rib_in) & (rr < rib_in + 8 / bw) & (y2 > -0.8 * bd)  # costal cartilage gap in front
    drop = u(30, 50) * (1 - np.cos(np.arctan2(x2, y2))) / 2  # ribs slope down towards the front
    pitch, z_rib0 = u(24, 30), u(0, 10)
    hu[ring[None] & (((z3 + drop[None] - z_rib0) % pitch) < u(7, 10)) & (z3 > u(20, 50))] = 0.8 * CORTEX
    hu[:, (np.abs(x2) < 14) & (y2 < -bd * (1 - fat) + 14) & (y2 > -bd * (1 - fat) + 2)] = 0.7 * CORTEX  # sternum
    vy, vr = bd * (1 - fat) - u(45, 60), u(15, 20)  # vertebral body: centre (posterior), radius
    vb = np.hypot(x2, y2 - vy)
    disc = ((z + u(0, 30)) % u(26, 32)) < 6
    hu[:, vb < vr] = np.where(disc, DISC, SPONGY)[:, None]
    hu[:, (vb >= vr - 2.5) & (vb < vr)] = np.where(disc, DISC, CORTEX)[:, None]
    hu[:, (np.abs(x2) < 7) & (y2 > vy + vr + 14) & (y2 < vy + vr + 40)] = 0.8 * CORTEX  # spinous process
    hu[:, np.hypot(x2, y2 - vy - vr - 8) < 8] = 20  # spinal canal
    # --- lungs: in-plane ellipses narrowing to the apex, above domed hemidiaphragms
    z_top = fov_z - u(20, 35) + dz
    z_dia = {'R': u(62, 82) + dz}
    z_dia['L'] = z_dia['R'] - u(5, 22)             # the liver lifts the right hemidiaphragm
    if f['ATEL']:
        atel_side = fr['ATEL'].choice(['R', 'L'])
        z_dia[atel_side] += fr['ATEL'].uniform(*ATEL_LIFT)  # volume loss pulls the diaphragm up
    lung = np.zeros(shape, bool)
    dia_map, cen = {}, {}
    for side, sgn in (('R', -1), ('L', 1)):
        cx, rx = sgn * bw * u(0.44, 0.5), bw * u(0.36, 0.42)
        cy, ry = bd * u(0.0, 0.1), bd * u(0.72, 0.82)
        qd = ((x2 - cx) / rx) ** 2 + ((y2 - cy) / ry) ** 2  # (H, W)
        dia = z_dia[side] + u(15, 30) * (1 - np.minimum(qd, 1)) - 25 * np.clip((y2 - cy) / ry, 0, 1)  # dome, posterior recess
        widest = z_dia[side] + 0.35 * (z_top - z_dia[side])
        s2 = np.where(z > widest, 1 - ((z - widest) / (z_top - widest)) ** 2, 1.0)
        lung |= (qd[None] < s2[:, None, None]) & (z3 > dia[None]) & (rr < rib_in)[None]
        dia_map[side], cen[side] = dia, (cx, cy, rx, ry)
    # --- heart: on the left hemidiaphragm, anterior, long axis tilted; cardiomegaly enlarges it
    scale = 1 + anat.normal(0, HEART_SD)
    if f['CARD']:  # this patient's heart, enlarged
        scale *= 1 + fr['CARD'].uniform(*CARD_SCALE)
    hr = np.array([45.0, bd * 0.42, bw * 0.36]) * scale * anat.normal(1, HEART_SHAPE_SD, 3)
    hc = np.array([z_dia['L'] + 0.7 * hr[0], -bd * u(0.12, 0.25), bw * u(0.06, 0.16)])
    a = np.deg2rad(u(20, 40))
    rot = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    hs = box(hc, hr.max() * np.ones(3), axes)
    heart = np.zeros(shape, bool)
    heart[hs] = ellipsoid_q(hc, hr, axes, hs, rot) < 1
    lung &= ~heart
    hu[heart] = soft
    # --- parenchyma: gravity gradient, texture, vessels where two smooth fields both cross zero (curves),
    # thicker near the hila; plus an unlabelled supine dependent density, posterior and basal, that a small
    # effusion must be told apart from (by texture and shape: an encoder can, a linear model on pooled pixels hardly)
    tex = smooth_noise(anat, shape, (12 / sz, 12 / sy, 12 / sx))
    hilum = np.sqrt(((z3 - z_dia['R'] - 0.4 * (z_top - z_dia['R'])) / 80) ** 2 + (y2 / 80) ** 2
                    + ((np.abs(x2) - 0.25 * bw) / 60) ** 2)
    thick = 0.08 + 0.25 * np.exp(-hilum)
    vessel = (np.abs(tex) < thick) & (np.abs(smooth_noise(anat, shape, (15 / sz, 15 / sy, 15 / sx))) < thick)
    dep = u(*DEPENDENT_HU) * np.clip((y2 / bd - 0.2) / 0.5, 0, 1)[None] * np.exp(-(z3 - min(z_dia.values())) / 50)
    hu[lung] = (LUNG + 40 * (y / bd)[None, :, None] + 12 * tex + VESSEL * vessel + dep)[lung]
    carina = z_dia['R'] + 0.55 * (z_top - z_dia['R'])
    hu[:, (np.abs(x2) < 8) & (np.abs(y2 + 0.1 * bd) < 8)] = np.where(z > carina, AIR, soft)[:, None]  # trachea
    below = (z3 < np.minimum(dia_map['R'], dia_map['L'])[None]) & (rr < rib_in)[None] & (x2 < 0)[None]
    hu[below & (hu == soft)] = LIVER

    # --- findings, confined to lung voxels; sizes, positions and contrast drawn per patient
    def blob(g, r, edge):
        """An irregular ellipsoid centred in a random lung voxel: (slices, weight in [0, 1])."""
        side = g.choice(['R', 'L'])
        cx, cy, rx, ry = cen[side]
        for _ in range(100):
            c = np.array([g.uniform(z_dia[side], z_top - 20), g.uniform(cy - ry, cy + ry), g.uniform(cx - rx, cx + rx)])
            if lung[tuple(min(int(round((ci - a[0]) / (a[1] - a[0]))), len(a) - 1) for ci, a in zip(c, axes))]:
                break
        rad = r * g.uniform(0.7, 1.3, 3)
        sl = box(c, rad * 1.5, axes)
        o, r = np.linalg.qr(g.standard_normal((3, 3)))
        q = ellipsoid_q(c, rad, axes, sl, o * np.sign(np.diag(r)))  # a random rotation
        q = q + 0.3 * smooth_noise(g, q.shape, (10 / sz, 10 / sy, 10 / sx))  # irregular border
        return sl, np.clip((1 - q) / edge, 0, 1) * lung[sl]

    if f['CONS']:
        g = fr['CONS']
        sl, w = blob(g, g.uniform(*CONS_RADIUS), 0.1)
        bronch = np.abs(smooth_noise(g, w.shape, (8 / sz, 8 / sy, 8 / sx))) < 0.2  # air bronchograms
        dense = np.where(bronch, LUNG, g.uniform(*CONS_HU) + 15 * g.standard_normal(w.shape))
        hu[sl] = hu[sl] * (1 - w) + dense * w
    if f['LO']:
        g = fr['LO']
        sl, w = blob(g, g.uniform(*LO_RADIUS), 1.0)  # soft edge: haze fading out
        hu[sl] += g.uniform(*LO_HU) * w
    if f['ATEL']:
        g = fr['ATEL']
        cx, cy, rx, ry = cen[atel_side]
        c = np.array([z_dia[atel_side] + g.uniform(15, 45), cy + g.uniform(-0.3, 0.5) * ry, cx + g.uniform(-0.3, 0.3) * rx])
        t, r, v = (g.uniform(*k) for k in ATEL_BAND)
        n = np.array([1.0, g.uniform(-0.4, 0.4), g.uniform(-0.4, 0.4)])
        n /= np.linalg.norm(n)  # a near-horizontal plate (plate-like atelectasis)
        sl = box(c, (r, r, r), axes)
        dz, dy, dx = (a[s] - ci for a, s, ci in zip(axes, sl, c))
        d = n[0] * dz[:, None, None] + n[1] * dy[None, :, None] + n[2] * dx[None, None, :]  # signed distance to the plane
        rad2 = dz[:, None, None] ** 2 + dy[None, :, None] ** 2 + dx[None, None, :] ** 2 - d ** 2
        hu[sl][(np.abs(d) < t / 2) & (rad2 < r * r) & lung[sl]] = v
    if f['EFF']:
        g = fr['EFF']
        for side in [['R'], ['L'], ['R', 'L']][g.choice(3, p=[0.4, 0.3, 0.3])]:
            cx, cy, rx, ry = cen[side]
            # a layer on the hemidiaphragm, deepest posteriorly (supine CT) and laterally (meniscus)
            w = np.clip(0.5 + 0.5 * (y2 - cy) / ry + 0.5 * ((x2 - cx) / rx) ** 2, 0.2, 1.5)
            level = dia_map[side] + g.uniform(*EFF_HEIGHT) * w
            hu[lung & (z3 < level[None]) & ((x2 - cx) * np.sign(cx) > -rx)[None]] = FLUID
    hu += noise.uniform(*NOISE_HU) * noise.standard_normal(shape, dtype=np.float32)
    return hu, tuple(float(s) for s in spacing_zyx)


def expose(rng, img):
    """A radiograph as a detector gives it: (img / max) ** gamma, a per-image tone curve, plus detector noise."""
    gamma = np.exp(rng.uniform(*np.log(XRAY_GAMMA)))
    x = (np.maximum(img, 0) / max(float(img.max()), 1e-6)) ** gamma
    return (x + rng.uniform(*XRAY_NOISE) * rng.standard_normal(x.shape)).astype(np.float32)


def drr(hu, spacing_zyx):
    """Digitally reconstructed radiograph: attenuation integrated anterior-posterior in mm of water, square
    pixels, displayed as usual (rows superior -> inferior, columns patient right -> left), dense = bright."""
    sz, sy, sx = spacing_zyx
    mu = np.maximum(hu.astype(np.float32) + 1000.0, 0.0) / 1000.0  # attenuation relative to water
    img = mu.sum(1) * sy                                            # (Z, W) water-equivalent mm
    s = min(sz, sx)
    img = ndimage.zoom(img, (sz / s, sx / s), order=1)             # square pixels: 2D has no spacing
    return np.ascontiguousarray(img[::-1], dtype=np.float32)       # superior at the top
