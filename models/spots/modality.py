"""TEM / 4D-STEM / precession spot patterns behind the modality contract.

Setup (setup.py): beam energy, reciprocal-space calibration, precession angle, beam centre
(given, or found per frame), ellipticity, scan rotation. Phases: built-in steel phases
(ferrite, austenite, cementite) or CIFs. Indexing (indexer.py): polar template matching as an
ONNX graph, refinement, the 180-degree ambiguity flag, reliability and confidence. A scan's
indexer (libraries and matcher graph, seconds to build the first time, cached on disk) is
kept for the next scan with the same setup, phases and options.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

import numpy as np

from liveindex.models.crystal import phases_from_wire
from liveindex.models.errors import InputError
from liveindex.models.modality import ExportHeader, Modality

from .results import FIELDS, METHODS

log = logging.getLogger(__name__)

KEEP_INDEXERS = 4
# The spot networks' first pass is on where the bundle covers the scan: on the benchmark set
# (benchmarks/spots_networks.py, 1200 moderate patterns, seed 7) right phase 98.2% -> 99.9%,
# within 3 deg modulo 180 84.6% -> 85.8%, about 0.5 ms a pattern more (README, "TEM spot patterns").
DEFAULT_INDEXER = "hybrid"
SIMULATED_CALIBRATION = 0.03  # 1/angstrom per pixel: 128 pixels span +-1.9/A (the benchmark's)


class Spots(Modality):
    name = "spots"
    description = "TEM / 4D-STEM / precession spot patterns: polar template matching (ONNX) + refinement"
    fields = FIELDS
    methods = METHODS

    def __init__(self):
        self._indexers: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()

    # -- command line -----------------------------------------------------------------------
    def add_arguments(self, parser, *, role: str) -> None:
        if role in ("index", "publish", "demo"):
            parser.add_argument("--phases", default="ferrite,austenite,cementite",
                                help="comma-separated phases: built-in names (ferrite, austenite, cementite) or CIF "
                                     "files, each optionally NAME=path (default: ferrite,austenite,cementite)")
            parser.add_argument("--kv", type=float, default=200.0, help="beam energy in kV (default 200)")
            parser.add_argument("--calibration", type=float, default=None,
                                help="reciprocal-space pixel size in 1/angstrom per pixel (default: the file's; "
                                     f"simulated scans {SIMULATED_CALIBRATION})")
            parser.add_argument("--precession", type=float, default=None,
                                help="precession angle in degrees (default: 0 for files, 1 for simulated scans)")
            parser.add_argument("--center", nargs=2, type=float, metavar=("X", "Y"),
                                help="direct-beam centre in pixels (default: found in each frame)")
            parser.add_argument("--ellipticity", nargs=2, type=float, metavar=("RATIO", "ANGLE"),
                                help="elliptical distortion: axis ratio and axis angle in degrees (default 1 0)")
            parser.add_argument("--scan-rotation", type=float, default=0.0,
                                help="angle of the scan's x axis in the diffraction image, degrees from the "
                                     "image's x (column) axis towards its y (row) axis; orientations are turned "
                                     "by it about the beam into the scan's frame (default 0)")
        if role in ("publish", "demo"):
            parser.add_argument("--noise", default="moderate", choices=["clean", "moderate", "hard"],
                                help="noise of the simulated detector")
            parser.add_argument("--seed", type=int, default=0, help="seed of the simulated scan")
            parser.add_argument("--pattern-size", type=int, default=128, help="simulated frames are N x N (default 128)")
        if role in ("index", "worker", "demo"):
            parser.add_argument("--resolution", type=float, default=2.0,
                                help="template library sampling of beam directions in degrees (default 2)")
            parser.add_argument("--no-refine", action="store_true", help="template matching only (faster, coarser)")
            parser.add_argument("--min-confidence", type=float, default=0.0, metavar="C",
                                help="points with confidence below C (0..1) are left not indexed (default 0)")
            parser.add_argument("--indexer", default=DEFAULT_INDEXER, choices=["hybrid", "templates"],
                                help="hybrid (default): where the bundle covers the scan's setup and every phase, "
                                     "its phase classifier restricts the template matcher's candidates to the phase "
                                     "it gives (probability >= 0.9) and that phase's orientation network fills in "
                                     "where the matcher has too few of it; elsewhere template matching alone (the "
                                     "log says why); templates: template matching alone")
            parser.add_argument("--bundle", metavar="DIR",
                                help="spot network bundle folder for --indexer hybrid (default: the shipped one, "
                                     "models/spots/bundles/default: ferrite, austenite, cementite at 200 kV, "
                                     "0.03/A per pixel, 1 deg precession, 128x128)")
        if role in ("index", "worker", "demo", "publish"):
            from liveindex.models.latent.encoder import LATENT_HELP, parse_latent

            parser.add_argument("--latent", type=parse_latent, default="on", metavar="on|off|pca|encoder[:PATH]",
                                help=LATENT_HELP + " (on rotation-invariant polar features; default on: 0.2-0.7 ms "
                                                   "a frame, 3-8%% of the indexing time; a worker takes what the "
                                                   "scan_start carries, so on or off only)")

    def add_commands(self, subparsers) -> None:
        from .train_cli import add_commands

        add_commands(subparsers)

    def indexing_options(self, args) -> dict:
        min_conf = getattr(args, "min_confidence", 0.0)
        if not 0.0 <= min_conf <= 1.0:
            raise InputError(f"--min-confidence {min_conf} is outside 0..1")
        resolution = getattr(args, "resolution", 2.0)
        if not 0.5 <= resolution <= 10.0:
            raise InputError(f"--resolution {resolution} deg is outside 0.5..10; 2 is the default")
        options = {"resolution": resolution, "refine": not getattr(args, "no_refine", False), "min_confidence": min_conf}
        indexer = getattr(args, "indexer", DEFAULT_INDEXER)
        if getattr(args, "bundle", None) and indexer != "hybrid":
            raise InputError("--bundle is for --indexer hybrid (the networks); --indexer templates uses none")
        if indexer == "hybrid":
            options["bundle"] = getattr(args, "bundle", None) or "default"
        from liveindex.models.latent.encoder import latent_choice

        latent = latent_choice(getattr(args, "latent", True))
        if latent is not True:  # off, or the embedding --latent names (the scan_start is made with it)
            options["latent"] = latent
        return options

    def _setup_from_args(self, args, *, simulated: bool) -> dict:
        setup = {"kv": getattr(args, "kv", 200.0), "scan_rotation": getattr(args, "scan_rotation", 0.0) or 0.0}
        calibration = getattr(args, "calibration", None)
        setup["calibration"] = calibration if calibration is not None else (SIMULATED_CALIBRATION if simulated else None)
        precession = getattr(args, "precession", None)
        setup["precession"] = precession if precession is not None else (1.0 if simulated else 0.0)
        if getattr(args, "center", None):
            setup["center"] = list(args.center)
        if getattr(args, "ellipticity", None):
            setup["ellipticity"] = list(args.ellipticity)
        return setup

    def open_source(self, args, *, role: str):
        from .files import SimulatedSpotSource, load_file
        from .phases import phases_from_spec
        from .setup import check_setup
        from .simulator import SimulatedSpotScan

        phases = phases_from_spec(getattr(args, "phases", None) or "ferrite,austenite,cementite")
        if getattr(args, "file", None):
            return load_file(args.file, modality=self, setup=self._setup_from_args(args, simulated=False),
                             phases=phases)
        text = getattr(args, "simulate", None) or getattr(args, "scan", "20x20")
        try:
            nx, ny = (int(v) for v in str(text).lower().split("x"))
            if nx < 1 or ny < 1:
                raise ValueError
        except ValueError:
            raise InputError(f"scan size {text!r} must look like 40x40 (width x height)") from None
        size = int(getattr(args, "pattern_size", 128))
        if not 32 <= size <= 1024:
            raise InputError(f"--pattern-size {size} must be 32..1024 pixels")
        setup = check_setup(self._setup_from_args(args, simulated=True), (size, size))
        scan = SimulatedSpotScan((ny, nx), phases, setup, pattern_shape=(size, size),
                                 noise=getattr(args, "noise", "moderate"), seed=getattr(args, "seed", 0))
        return SimulatedSpotSource(self, scan, setup, phases)

    def detector_setup(self, args, pattern_shape):
        """(setup, phases, step) for frames from a detector stream (``publish --detector``):
        the stream carries frames and the scan shape; --calibration (which no stream carries),
        --kv, --precession, --center and --phases the rest (the map's step: one point)."""
        from .phases import phases_from_spec
        from .setup import check_setup

        if getattr(args, "calibration", None) is None:
            raise InputError("frames from a detector stream carry no reciprocal-space calibration: give "
                             "--calibration (1/angstrom per pixel)")
        setup = check_setup(self._setup_from_args(args, simulated=False), tuple(pattern_shape))
        phases = phases_from_spec(getattr(args, "phases", None) or "ferrite,austenite,cementite")
        return setup, phases, (1.0, 1.0)  # a step in the scan's own units: the stream carries none

    def python_source(self, patterns, *, setup=None, phases=None, step=None):
        from liveindex.models.arrays import ArraySource

        from .phases import phases_from_spec

        if not isinstance(setup, dict):
            raise InputError("spot patterns need setup={'calibration': ..., 'kv': ..., 'precession': ...}")
        records = phases_from_spec(phases if phases is not None else "ferrite,austenite,cementite")
        data = np.asarray(patterns)
        return ArraySource(data, modality=self, setup=setup, phases=records, step=step or (1.0, 1.0)), {}

    def latent_start(self, source) -> dict:
        """The scan's latent basis, fitted on 3x3 tiles of its frames' polar features (latent.py),
        or the encoder --latent names, normalised on them (models/latent/encoder.py)."""
        from liveindex.models.latent.encoder import latent_start

        from .latent import DIMS, SpotFeatures, feature_shape, fit_scan_basis

        return latent_start(source, self.name, fit_pca=fit_scan_basis, dims=DIMS,
                            features=SpotFeatures(source.setup, source.pattern_shape), feature_shape=feature_shape())

    # -- a scan -------------------------------------------------------------------------------
    def check_setup(self, setup: dict, pattern_shape) -> dict:
        from .setup import check_setup

        return check_setup(setup, pattern_shape)

    def describe_setup(self, setup: dict) -> list[tuple[str, str]]:
        from .setup import describe

        return describe(setup)

    def export_header(self, setup: dict, pattern_shape) -> ExportHeader:
        """Beam energy for the .ang/.ctf headers; the reciprocal-space setup for the HDF5 file."""
        detector = {"calibration_per_angstrom": float(setup.get("calibration") or 0.0),
                    "precession_deg": float(setup.get("precession") or 0.0),
                    "pattern_shape": [int(n) for n in pattern_shape]}
        if setup.get("center") is not None:
            detector["center"] = [float(v) for v in setup["center"]]
        kv = setup.get("kv")
        return ExportHeader(energy_kv=float(kv) if kv is not None else None, detector=detector)

    def prepare(self, scan_start: dict, *, options: dict | None = None, threads: int = 1, providers: str = "auto",
                progress: bool = False, reason: str = ""):
        from liveindex.models.latent.basis import basis_of_scan

        from .indexer import SpotIndexer
        from .setup import check_setup

        options = dict(options or {})
        latent = options.pop("latent", True)
        shape = tuple(int(n) for n in scan_start["pattern_shape"])
        setup = check_setup(scan_start["setup"], shape)
        records = phases_from_wire(scan_start["phases"])
        for record in records:
            if not record.atoms:
                raise InputError(f"phase {record.name} has no atoms; spot intensities need the atom sites of a CIF")
        key = (repr(sorted(setup.items())), shape, tuple(repr(r.to_wire()) for r in records),
               repr(sorted(options.items())), threads, providers)
        with self._lock:
            indexer = self._indexers.get(key)
            if indexer is None:
                indexer = SpotIndexer(setup, records, shape, resolution=options.get("resolution", 2.0),
                                      refine=options.get("refine", True),
                                      min_confidence=options.get("min_confidence", 0.0), providers=providers,
                                      threads=threads, bundle=options.get("bundle"))
                self._indexers[key] = indexer
                while len(self._indexers) > KEEP_INDEXERS:
                    self._indexers.popitem(last=False)
            self._indexers.move_to_end(key)
        return SpotPageIndexer(indexer, setup, shape, basis_of_scan(scan_start) if latent else None)


class SpotPageIndexer:
    """One scan's pages: the shared SpotIndexer (kept between scans), its orientations turned by
    the setup's scan rotation into the scan's frame, plus the embedding in the scan's own latent
    basis, computed on the centres the indexer found."""

    def __init__(self, indexer, setup: dict, pattern_shape, latent=None):
        from .latent import SpotFeatures

        self.indexer = indexer
        self.latent = latent  # the scan's LatentBasis, or None (no embedding)
        self.features = SpotFeatures(setup, pattern_shape)
        self.scan_rotation = float(setup.get("scan_rotation") or 0.0)

    @property
    def model_name(self) -> str:
        return self.indexer.model_name

    def index(self, frames: np.ndarray) -> dict[str, np.ndarray]:
        from .diffraction import scan_frame
        from .latent import embed

        fields = self.indexer.index(frames)
        if self.scan_rotation:
            # The one place the scan rotation is applied: every scan's pages (index, workers,
            # the sink's cluster means) come through here; the indexer answers in the image's frame.
            indexed = fields["phase_id"] >= 0
            turned = scan_frame(fields["quaternion"][indexed], self.scan_rotation)
            fields["quaternion"][indexed] = turned.astype(fields["quaternion"].dtype)
        fields["embedding"] = embed(self.latent, self.features, frames, fields["center"])
        return fields
