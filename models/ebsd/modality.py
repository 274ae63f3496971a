"""EBSD behind the modality contract: options, setup, sources and the per-scan indexer.

The setup is the detector geometry (PC in the Bruker convention, sample and detector tilt,
binning, pixel size, kV: ``DetectorGeometry.to_wire``). Phases are records whose source
names a master pattern (``builtin:ni``). A scan's ``ScanIndexer`` (dictionary, matcher,
network, refiners: seconds to build for a new geometry) is kept for the next scan with the
same geometry, phases and options; each scan gets its own static background.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict

import numpy as np

from liveindex.models.crystal import phases_from_wire
from liveindex.models.errors import InputError
from liveindex.models.modality import Modality

from .results import FIELDS, METHODS, NCC_METHODS

log = logging.getLogger(__name__)

PC_CONVENTIONS = ("bruker", "tsl", "edax", "oxford", "emsoft")
KEEP_INDEXERS = 4  # scan indexers (geometry x phases x options) a process keeps


class EBSD(Modality):
    name = "ebsd"
    description = "EBSD Kikuchi patterns (SEM): dictionary + network + Gauss-Newton refinement on master patterns"
    fields = FIELDS
    methods = METHODS

    def __init__(self):
        self._indexers: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()

    # -- command line -----------------------------------------------------------------------
    def add_arguments(self, parser, *, role: str) -> None:
        if role in ("index", "publish"):
            parser.add_argument("--pc", nargs=3, metavar=("X", "Y", "Z"), type=float,
                                help="projection centre; Bruker convention unless --pc-convention says otherwise")
            parser.add_argument("--pc-convention", default="bruker", choices=list(PC_CONVENTIONS))
            parser.add_argument("--tilt", type=float, help="sample tilt in degrees (default: the file's, else 70)")
            parser.add_argument("--step", nargs="+", type=float, metavar=("DX", "DY"),
                                help="scan step in micrometres, one value for a square grid (default: the file's; "
                                     ".npy arrays store none: 1)")
        if role in ("index", "publish", "demo"):
            parser.add_argument("--phases", default="ni",
                                help="comma-separated expected phases: built-in names (ni, fe, ni3al), CIF files "
                                     "(kinematical master pattern from the atoms) or EMsoft master-pattern .h5 files "
                                     "(dynamical), each optionally NAME=path (default: ni)")
        if role in ("publish", "demo"):
            parser.add_argument("--noise", default="moderate", choices=["clean", "moderate", "hard"],
                                help="noise of the simulated detector")
            parser.add_argument("--seed", type=int, default=0, help="seed of the simulated scan")
        if role in ("index", "worker", "demo"):
            parser.add_argument("--resolution", type=float, default=3.0, help="dictionary sampling in degrees")
        if role in ("index", "worker"):
            _add_indexing_arguments(parser)
        if role in ("index", "worker", "demo", "publish"):
            from liveindex.models.latent.encoder import LATENT_HELP, parse_latent

            parser.add_argument("--latent", type=parse_latent, default="on", metavar="on|off|pca|encoder[:PATH]",
                                help=LATENT_HELP + " (default on: about 3%% of the indexing time; a worker takes "
                                                   "what the scan_start carries, so on or off only)")
        if role == "index":
            parser.add_argument("--refine-pc", action="store_true",
                                help="fit the projection centre on the scan's first sure points, then index every "
                                     "point with it (the fitted PC is logged and written to OUT.json)")

    def indexing_options(self, args) -> dict:
        options = {"resolution": getattr(args, "resolution", 3.0)}
        if hasattr(args, "min_confidence"):
            options.update(_indexing_options(args))
        if getattr(args, "refine_pc", False):
            options["refine_pc"] = True
        from liveindex.models.latent.encoder import latent_choice

        latent = latent_choice(getattr(args, "latent", True))
        if latent is not True:  # off, or the embedding --latent names (the scan_start is made with it)
            options["latent"] = latent
        return options

    def open_source(self, args, *, role: str):
        from .files import SimulatedSource, load_file
        from .master_patterns import phases_from_spec
        from .simulator import SimulatedScan, parse_nav_shape

        phases = phases_from_spec(getattr(args, "phases", "ni"))
        if getattr(args, "follow", None):
            from .growing_files import follow_file

            scan_shape = getattr(args, "scan_shape", None)
            try:
                scan_shape = parse_nav_shape(scan_shape) if scan_shape else None
            except ValueError as exc:
                raise InputError(f"--scan-shape: {exc}") from None
            return follow_file(args.follow, phases=phases, pc=getattr(args, "pc", None),
                               pc_convention=getattr(args, "pc_convention", "bruker"), tilt=getattr(args, "tilt", None),
                               step=getattr(args, "step", None), scan_shape=scan_shape,
                               follow_timeout=args.follow_timeout)
        if getattr(args, "file", None):
            source = load_file(args.file, phases=phases, pc=getattr(args, "pc", None),
                               pc_convention=getattr(args, "pc_convention", "bruker"), tilt=getattr(args, "tilt", None),
                               step=getattr(args, "step", None))
            # The file's static background reaches the indexer through indexing_options, which
            # `liveindex index` calls after this (live workers use their own, or the running mean).
            args.file_static_background = source.file_setup.static_background
            if source.file_setup.static_background is not None:
                # Workers on other hosts have no copy of the file: the background travels in
                # the scan_start setup (a worker's own --static-background still wins).
                source.setup[SETUP_BACKGROUND] = background_to_wire(source.file_setup.static_background)
            return source
        geometry = _geometry(args)
        try:
            nav_shape = parse_nav_shape(getattr(args, "simulate", None) or getattr(args, "scan", "40x40"))
        except ValueError as exc:
            raise InputError(str(exc)) from None
        source = SimulatedSource(SimulatedScan(nav_shape, noise=getattr(args, "noise", "moderate"),
                                               seed=getattr(args, "seed", 0), geometry=geometry, phase=phases))
        if getattr(args, "step", None):
            from .files import step_of

            source.step = step_of(None, args.step)
        return source

    def detector_setup(self, args, pattern_shape):
        """The geometry from --pc/--pc-convention/--tilt (a detector stream carries none), the
        phases from --phases, the step from --step."""
        from .files import step_of
        from .geometry import DetectorGeometry
        from .master_patterns import phases_from_spec

        if getattr(args, "pc", None) is None:
            raise InputError("frames from a detector stream carry no projection centre: give --pc X Y Z (Bruker; "
                             "--pc-convention tsl|oxford|emsoft for the others)")
        tilt = getattr(args, "tilt", None)
        geometry = DetectorGeometry.from_convention(tuple(float(v) for v in args.pc), args.pc_convention,
                                                    pattern_shape=tuple(pattern_shape),
                                                    sample_tilt=70.0 if tilt is None else tilt)
        return geometry.to_wire(), phases_from_spec(getattr(args, "phases", "ni")), step_of(None, args.step)

    def python_source(self, patterns, *, setup=None, phases=None, step=None):
        from .files import python_source

        return python_source(patterns, detector=setup, phases=phases if phases is not None else ("ni",), step=step)

    def add_commands(self, subparsers) -> None:
        from .cli import add_commands

        add_commands(subparsers)

    def pattern_from_features(self, features, feature_shape, pattern_shape):
        from .latent import frames_from_features

        return frames_from_features(features, feature_shape, pattern_shape)

    def latent_start(self, source) -> dict:
        """The scan's latent basis, fitted on 3x3 tiles of its frames (models/ebsd/latent.py), or
        the encoder --latent names, normalised on them (models/latent/encoder.py)."""
        from liveindex.models.latent.basis import DEFAULT_DIMS
        from liveindex.models.latent.encoder import latent_start

        from .latent import feature_shape, features, fit_scan_basis

        return latent_start(source, self.name, fit_pca=fit_scan_basis, features=features,
                            feature_shape=feature_shape(source.pattern_shape), dims=DEFAULT_DIMS)

    # -- a scan -------------------------------------------------------------------------------
    def check_setup(self, setup: dict, pattern_shape) -> dict:
        from .geometry import DetectorGeometry

        if not isinstance(setup, dict):
            raise InputError("the EBSD setup must be a map of the detector geometry (pc, sample_tilt, tilt, ...)")
        checked = DetectorGeometry.from_wire(setup).with_shape(pattern_shape).to_wire()
        if setup.get(SETUP_BACKGROUND) is not None:
            background_from_wire(setup[SETUP_BACKGROUND], pattern_shape)  # refuses a malformed one
            checked[SETUP_BACKGROUND] = setup[SETUP_BACKGROUND]
        return checked

    def describe_setup(self, setup: dict) -> list[tuple[str, str]]:
        pc = setup.get("pc") or []
        return [("PC (Bruker)", ", ".join(f"{v:.4f}" for v in pc)),
                ("sample tilt", f"{setup.get('sample_tilt')}°"), ("detector tilt", f"{setup.get('tilt')}°"),
                ("binning", str(setup.get("binning"))), ("beam energy", f"{setup.get('energy_kv')} kV")] + (
            [("working distance", f"{setup['working_distance_mm']} mm")] if setup.get("working_distance_mm") else []) + (
            [("static background", "the file's ({}x{})".format(*setup[SETUP_BACKGROUND].get("shape", ("?", "?"))))]
            if isinstance(setup.get(SETUP_BACKGROUND), dict) else [])

    def export_header(self, setup: dict, pattern_shape):
        """The PC in the TSL convention (the .ang header), tilts, kV, working distance where the
        setup has one, the detector for the HDF5 file and kikuchipy's detector file."""
        from .conventions import export_header

        return export_header(setup, pattern_shape)

    def prepare(self, scan_start: dict, *, options: dict | None = None, threads: int = 1, providers: str = "auto",
                progress: bool = False, reason: str = "") -> "EBSDPageIndexer":
        from liveindex.models.latent.basis import basis_of_scan

        from .geometry import DetectorGeometry
        from .master_patterns import register

        options = dict(options or {})
        geometry = DetectorGeometry.from_wire(scan_start["setup"]).with_shape(scan_start["pattern_shape"])
        records = phases_from_wire(scan_start["phases"])
        names = [register(p) for p in records]
        if options.get("min_confidence") is None:
            options["min_confidence"] = default_min_confidence(records)
        if options.get("static_background") is None and scan_start["setup"].get(SETUP_BACKGROUND) is not None:
            options["static_background"] = background_from_wire(scan_start["setup"][SETUP_BACKGROUND],
                                                                 scan_start["pattern_shape"])
        refine_pc = options.pop("refine_pc", False)
        latent = basis_of_scan(scan_start) if options.pop("latent", True) else None
        reason = reason or f"scan {scan_start.get('scan', '')} has geometry {geometry.cache_key()}"

        def build(at: DetectorGeometry, why: str = reason):
            return self._scan_indexer(at, names, options, threads=threads, providers=providers, progress=progress,
                                      reason=why)

        return EBSDPageIndexer(build, geometry, names, options, refine_pc=refine_pc, latent=latent)

    def _scan_indexer(self, geometry, names, options: dict, *, threads: int, providers: str, progress: bool,
                      reason: str):
        """The ScanIndexer for this geometry, phases and options: the one kept from an earlier scan, or a new one."""
        key = (geometry.cache_key(), tuple(names), _options_key(options), threads, providers)
        with self._lock:
            indexer = self._indexers.get(key)
            if indexer is None:
                from .indexer import ScanIndexer

                indexer = ScanIndexer(geometry, names, threads=threads, providers=providers, progress=progress,
                                      reason=reason, **options)
                self._indexers[key] = indexer
                while len(self._indexers) > KEEP_INDEXERS:
                    self._indexers.popitem(last=False)
            self._indexers.move_to_end(key)
        return indexer


SETUP_BACKGROUND = "static_background"  # the file's static background, in the scan_start setup


def background_to_wire(background: np.ndarray) -> dict:
    background = np.ascontiguousarray(background, np.float32)
    return {"shape": list(background.shape), "float32": background.tobytes()}


def background_from_wire(wire, pattern_shape) -> np.ndarray:
    """The setup's static background as an (H, W) float32 array; InputError (one line) where it
    is not one finite frame of the scan's pattern shape."""
    try:
        shape = tuple(int(v) for v in wire["shape"])
        data = np.frombuffer(wire["float32"], np.float32)
        if shape != tuple(int(v) for v in pattern_shape) or data.size != int(np.prod(shape)):
            raise ValueError(f"{data.size} values for shape {shape}, patterns {tuple(pattern_shape)}")
        if not np.isfinite(data).all():
            raise ValueError("values that are not finite")
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"the scan's static background is malformed ({exc}); send one (H, W) float32 frame of the "
                         "patterns' shape, or none") from None
    return data.reshape(shape).copy()


USER_PHASES_MIN_CONFIDENCE = 0.5


def default_min_confidence(records) -> float:
    """0.5 where any phase comes from a file (the user's own list: a point no listed phase
    explains is marked, not mapped as the nearest phase); 0 for built-in phases only, where
    every point keeps its best answer as before."""
    from .master_patterns import BUILTIN_SOURCE

    user_given = any(not (r.source or "").startswith(BUILTIN_SOURCE) for r in records)
    return USER_PHASES_MIN_CONFIDENCE if user_given else 0.0


class EBSDPageIndexer:
    """One scan's pages: the shared ScanIndexer with the scan's own static background.

    With ``refine_pc`` the ScanIndexer is built only once ``calibrate`` has found the PC, so
    that its dictionary is made for the PC the scan is indexed at (at the given PC, 0.05 off,
    the best templates are wrong for about half of the points)."""

    def __init__(self, build, geometry, phases, options: dict, *, refine_pc: bool = False, latent=None):
        self._build = build  # geometry -> ScanIndexer
        self.latent = latent  # the scan's LatentBasis, or None (no embedding)
        self.geometry, self.phases, self.options = geometry, list(phases), options
        self.refine_pc = refine_pc
        self._indexer = None
        self._lock = threading.Lock()
        if not refine_pc:
            self._use(build(geometry))

    def _use(self, indexer) -> None:
        self.background = indexer.new_background()
        self._indexer = indexer

    @property
    def indexer(self):
        with self._lock:
            if self._indexer is None:  # refine_pc without calibrate: index at the given PC
                self._use(self._build(self.geometry))
            return self._indexer

    @property
    def model_name(self) -> str:
        return self.indexer.model_name

    def index(self, frames: np.ndarray) -> dict[str, np.ndarray]:
        from .latent import embed
        from .quality import image_quality

        indexer = self.indexer
        fields = indexer.index(frames, self.background).fields()
        fields["iq"] = image_quality(frames)
        fields["fit"] = fit_from_score(fields)
        fields["embedding"] = embed(self.latent, frames)
        return fields

    def calibrate(self, frames: np.ndarray) -> dict | None:
        """With ``refine_pc``: search the projection centre on these first frames (pc_fit.py) and
        index every page at it; returns what the search found (for OUT.json) and, as ``setup``,
        the setup with the fitted PC (the written files' headers use it)."""
        if not self.refine_pc:
            return None
        from .pc_fit import calibrate_pc, log_fit

        fit = calibrate_pc(frames, self.geometry, self.phases, signal_mask=self.options.get("signal_mask"),
                           static_background=self.options.get("static_background"))
        log_fit(fit)
        with self._lock:
            self.geometry = fit.geometry
            self._use(self._build(fit.geometry, "the projection centre --refine-pc found"))
        return {"pc_refinement": fit.report(),
                "setup": fit.geometry.to_wire()}  # the files' headers (the .ang PC) take the fitted PC


def fit_from_score(fields: dict[str, np.ndarray]) -> np.ndarray:
    """The ``fit`` field: 1 - NCC of the answer (the refined NCC where it was refined; the best
    template's where matching was not refined), lower is better, as OIM's fit and AZtec's MAD
    (but not in degrees); NaN where there is no NCC (the network alone) and where not indexed."""
    has_ncc = np.isin(fields["method"], NCC_METHODS) & (fields["phase_id"] >= 0)
    return np.where(has_ncc, 1.0 - fields["score"], np.nan).astype(np.float32)


def _options_key(options: dict) -> tuple:
    """A hashable key of indexing options (arrays by their bytes)."""
    parts = []
    for name in sorted(options):
        value = options[name]
        if isinstance(value, np.ndarray):
            value = hashlib.sha1(np.ascontiguousarray(value).tobytes()).hexdigest() + str(value.shape)
        parts.append((name, value))
    return tuple(parts)


def _geometry(args):
    """The geometry the user gave (PC, tilt), or None to use the file's own (or the default)."""
    from .geometry import DetectorGeometry

    pc = getattr(args, "pc", None)
    tilt = getattr(args, "tilt", None)
    if pc is None:
        return None if tilt is None else DetectorGeometry(sample_tilt=tilt)
    extra = {"sample_tilt": tilt if tilt is not None else 70.0}
    return DetectorGeometry.from_convention(tuple(float(v) for v in pc), args.pc_convention, **extra)


def _add_indexing_arguments(p) -> None:
    p.add_argument("--no-refine", action="store_true",
                   help="template matching only (faster, about 1.4 deg median instead of 0.05-0.5 deg)")
    p.add_argument("--min-confidence", type=float, default=None, metavar="C",
                   help="points with confidence below C (0..1) get phase -1 (they fit no listed phase well enough); "
                        "confidence above 0.5 means right phase and within 3 deg at least 99%% of the time "
                        "(default: 0.5 where a scan's phases come from files, the user's own material; 0 for the "
                        "built-in phases)")
    p.add_argument("--static-background", metavar="FILE.npy",
                   help="the detector's static background (default: each scan's running mean frame)")
    p.add_argument("--signal-mask", metavar="FILE.npy",
                   help="boolean (H, W) array, True where the detector carries pattern (for example the "
                        "phosphor's circle); pixels outside are ignored everywhere (default: every pixel)")
    p.add_argument("--indexer", choices=("hybrid", "network", "templates"), default="hybrid",
                   help="hybrid (default): the network first, template matching where it is unsure or the "
                        "bundle does not cover the scan; network: the network only; templates: template matching only")
    p.add_argument("--bundle", metavar="DIR", help="network bundle folder (default: the one shipped in the package)")


def _indexing_options(args) -> dict:
    if args.min_confidence is not None and not 0.0 <= args.min_confidence <= 1.0:
        raise InputError(f"--min-confidence {args.min_confidence} is outside 0..1; confidence 0.5 is the point "
                         "above which at least 99% of points are right")
    background = getattr(args, "file_static_background", None)  # open_source's: the file's own
    if isinstance(args.static_background, np.ndarray):  # the Python API passes arrays
        background = args.static_background.astype(np.float32)
    elif args.static_background:
        if background is not None:
            log.info("static background from --static-background, not the file's")
        try:
            background = np.load(args.static_background).astype(np.float32)
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read the static background {args.static_background}: {exc}; give a "
                             ".npy of one (H, W) frame") from None
        if background.ndim != 2:
            raise InputError(f"the static background {args.static_background} has shape {background.shape}; "
                             "give one (H, W) frame")
    mask = None
    if isinstance(args.signal_mask, np.ndarray):
        mask = args.signal_mask
    elif args.signal_mask:
        try:
            mask = np.load(args.signal_mask)
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read the signal mask {args.signal_mask}: {exc}; give a .npy of one (H, W) "
                             "boolean array, True where the pattern is") from None
    if mask is not None:
        if mask.ndim != 2 or not (mask.dtype == bool or np.isin(mask, (0, 1)).all()):
            raise InputError(f"the signal mask is {mask.dtype} of shape {mask.shape}; give one (H, W) array of "
                             "booleans (or 0/1), True where the pattern is")
        mask = mask.astype(bool)
    return {"refine": not args.no_refine, "min_confidence": args.min_confidence, "static_background": background,
            "signal_mask": mask, "indexer": args.indexer, "bundle": args.bundle}
