"""ARM64 check without a device: run ``mobileqat device-check`` on a package under user-mode QEMU.

    python tools/arm64/arm64_check.py [--package PKG] [--cpus cortex-a53 neoverse-n1 neoverse-n2]

Builds (once, cached in $MOBILEQAT_ARM64_CACHE or ~/.cache/mobileqat/arm64) an aarch64 root:
- Debian arm64 python3.11 and its libraries, fetched with ``apt-get download`` under a private apt
  configuration (APT::Architecture=arm64; the host's own Debian mirror, read from its apt sources) and
  unpacked with ``dpkg -x``; nothing is installed on the host and no root rights are needed;
- the manylinux aarch64 wheels of ai-edge-litert, numpy and pillow (the host's versions) from
  ``pip download``, unzipped into the root's site-packages;
- a ``qemu-aarch64`` binary: the static one of the next Debian release's qemu-user package (QEMU 10)
  when apt can fetch it, else Debian 12's qemu-user-static (QEMU 7.2), whose guest sees the host's x86
  /proc/cpuinfo (LiteRT's CPU detection crashes on it): an ARM cpuinfo generated under the same -cpu
  (from the HWCAP bits QEMU gives the guest) is written to ROOT/proc/cpuinfo before each run, which
  QEMU 7.2 reads through -L ROOT. QEMU 7.2's ``-cpu max`` (SME) gives wrong XNNPACK output: not used.
Then, for each CPU model, runs ``qemu-aarch64 -cpu MODEL -L ROOT ROOT/usr/bin/python3.11 -m
mobileqat.device_check PKG`` (no binfmt, no chroot; PYTHONPATH set for the emulated process only):
the golden codes of both runtimes must come out bit for bit. Without --package a tiny demo package is
built first on the host (TensorFlow needed there). Exit 0 when every CPU model passes.
"""
import argparse
import glob
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE = os.environ.get("MOBILEQAT_ARM64_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mobileqat", "arm64")
PYTHON_DEBS = ["python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "libc6", "libgcc-s1",
               "libstdc++6", "zlib1g", "libexpat1", "libssl3", "libffi8", "libbz2-1.0", "liblzma5", "libuuid1",
               "libcrypt1"]
# -cpu model -> what it stands for (issue 14): no dot product, dot product, i8mm
CPUS = {"cortex-a53": "Armv8.0-A, no dot product", "cortex-a76": "Armv8.2-A, dot product",
        "neoverse-n1": "Armv8.2-A, dot product", "neoverse-n2": "Armv9.0-A, dot product and i8mm"}
DEFAULT_CPUS = ("cortex-a53", "neoverse-n1", "neoverse-n2")
WHEEL_PLATFORM = "manylinux_2_27_aarch64"


def log(msg):
    print(f"[arm64-check] {msg}", flush=True)


def run(cmd, **kw):
    kw.setdefault("check", True)
    return subprocess.run(cmd, **kw)


def debian_mirror():
    """(URI, codename) of the host's Debian main archive, from its apt sources (deb822 or one-line)."""
    codename = None
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("VERSION_CODENAME="):
                    codename = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    uris = []
    for path in ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*")):
        if not (path.endswith(".list") or path.endswith(".sources")):
            continue
        try:
            text = open(path).read()
        except OSError:
            continue
        if path.endswith(".sources"):
            for stanza in text.split("\n\n"):
                fields = dict(line.split(":", 1) for line in stanza.splitlines() if ":" in line and not line.startswith("#"))
                fields = {k.strip(): v.strip() for k, v in fields.items()}
                if "deb" in fields.get("Types", "").split() and "main" in fields.get("Components", "").split():
                    uris += [(u, fields.get("Suites", "").split()) for u in fields.get("URIs", "").split()]
        else:
            for line in text.splitlines():
                parts = line.split("#", 1)[0].split()
                if len(parts) >= 4 and parts[0] == "deb":
                    parts = [p for p in parts if not p.startswith("[")] if "[" not in line else \
                        ["deb"] + line.split("]", 1)[1].split()
                    uris.append((parts[1], parts[2:3]))
    for uri, suites in uris:
        if uri.rstrip("/").endswith("/debian") and (codename is None or codename in suites):
            return uri.rstrip("/"), codename or suites[0]
    raise SystemExit("arm64-check: no Debian main archive found in /etc/apt/sources.list(.d); this check needs a "
                     "Debian host whose apt reaches the Debian archive.")


NEXT = {"bookworm": "trixie", "trixie": "forky"}


class Apt:
    """apt-get with a private configuration under CACHE/apt/NAME: its own sources, lists and (empty) status."""

    def __init__(self, name, arch, suite, uri):
        self.base = base = os.path.join(CACHE, "apt", name)
        for d in ("lists/partial", "cache/archives/partial", "parts", "sourceparts", "prefs"):
            os.makedirs(os.path.join(base, d), exist_ok=True)
        sources, status = os.path.join(base, "sources.list"), os.path.join(base, "status")
        with open(sources, "w") as f:
            f.write(f"deb [arch={arch} signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {uri} {suite} main\n")
        open(status, "a").close()
        self.suite, self.arch = suite, arch
        self.opts = ["-o", f"Dir::Etc::SourceList={sources}", "-o", f"Dir::Etc::SourceParts={base}/sourceparts",
                     "-o", f"Dir::Etc::Parts={base}/parts", "-o", f"Dir::Etc::PreferencesParts={base}/prefs",
                     "-o", f"Dir::State::Lists={base}/lists", "-o", f"Dir::State::status={status}",
                     "-o", f"Dir::Cache={base}/cache", "-o", f"APT::Architecture={arch}",
                     "-o", f"APT::Architectures={arch}", "-o", "Debug::NoLocking=1", "-o", "Acquire::Languages=none"]
        if os.geteuid() == 0:
            self.opts += ["-o", "APT::Sandbox::User=root"]

    def __call__(self, *args, cwd=None):
        r = subprocess.run(["apt-get", "-q"] + self.opts + list(args), cwd=cwd, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"apt-get {' '.join(args)} ({self.suite}/{self.arch}) failed: "
                               f"{(r.stderr or r.stdout).strip()[-600:]}")
        return r

    def download(self, packages, dest):
        """The .deb files of ``packages`` in ``dest`` (downloaded once)."""
        os.makedirs(dest, exist_ok=True)
        self("update")
        self("download", *packages, cwd=dest)
        debs = sorted(glob.glob(os.path.join(dest, "*.deb")))
        missing = [p for p in packages if not any(os.path.basename(d).startswith(p + "_") for d in debs)]
        if missing:
            raise RuntimeError(f"apt-get download left out {missing}")
        return debs


def host_versions():
    """{distribution: version} of the host packages the root mirrors (same kernels as the x86 run)."""
    from importlib import metadata
    return {name: metadata.version(name) for name in ("ai-edge-litert", "numpy", "pillow")}


def build_root(root):
    """The aarch64 root with python3.11, numpy, pillow and ai-edge-litert (skipped when ROOT/.complete exists)."""
    marker = os.path.join(root, ".complete")
    versions = host_versions()
    want = " ".join(f"{k}=={v}" for k, v in sorted(versions.items()))
    if os.path.exists(marker) and open(marker).read().strip() == want:
        return root
    uri, codename = debian_mirror()
    tmp = root + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    t0 = time.perf_counter()
    log(f"aarch64 root: Debian {codename} arm64 python3.11 from the host's Debian archive")
    debs = Apt("arm64-" + codename, "arm64", codename, uri).download(PYTHON_DEBS, os.path.join(CACHE, "debs-arm64"))
    for deb in debs:
        run(["dpkg", "-x", deb, tmp])
    site = os.path.join(tmp, "site-packages")
    wheels = os.path.join(CACHE, "wheels")
    log(f"aarch64 wheels ({WHEEL_PLATFORM}, cp311): {want}")
    run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--platform", WHEEL_PLATFORM,
         "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311", "-d", wheels]
        + [f"{k}=={v}" for k, v in sorted(versions.items())])
    for whl in sorted(glob.glob(os.path.join(wheels, "*.whl"))):
        with zipfile.ZipFile(whl) as z:
            z.extractall(site)
    for so in glob.glob(os.path.join(site, "**", "*.so*"), recursive=True):
        os.chmod(so, 0o755)
    with open(os.path.join(tmp, ".complete"), "w") as f:
        f.write(want + "\n")
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    log(f"aarch64 root ready in {time.perf_counter() - t0:.0f} s: {root}")
    return root


def qemu_binary(which="auto"):
    """(path, version text) of a qemu-aarch64 that runs as is: QEMU 10 (the next Debian release's qemu-user) if
    apt can fetch it, else the host release's qemu-user-static (QEMU 7.2 on Debian 12); ``which``: "next" or
    "current" for only one of them. Cached under CACHE/qemu."""
    uri, codename = debian_mirror()
    choices = [(NEXT.get(codename), "qemu-user", "next"), (codename, "qemu-user-static", "current")]
    choices = [c for c in choices if c[0] and which in ("auto", c[2])]
    for suite, package, _ in choices:
        for path in sorted(glob.glob(os.path.join(CACHE, "qemu", f"{suite}-{package}", "usr", "bin", "qemu-aarch64*"))):
            ok, version = _qemu_version(path)
            if ok:
                return path, version
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True).stdout.strip()
    tried = []
    for suite, package, _ in choices:
        dest = os.path.join(CACHE, "qemu", f"{suite}-{package}")
        try:
            debs = Apt(f"{arch}-{suite}", arch, suite, uri).download([package], dest + ".debs")
            shutil.rmtree(dest, ignore_errors=True)
            run(["dpkg", "-x", debs[0], dest])
        except (RuntimeError, subprocess.CalledProcessError) as e:
            tried.append(f"{suite} {package}: {e}")
            continue
        for path in sorted(glob.glob(os.path.join(dest, "usr", "bin", "qemu-aarch64*"))):
            ok, version = _qemu_version(path)
            if ok:
                return path, version
            tried.append(f"{path}: {version}")
    raise SystemExit("arm64-check: no runnable qemu-aarch64: " + "; ".join(tried))


def _qemu_version(path):
    try:
        r = subprocess.run([path, "-version"], capture_output=True, text=True, timeout=30)
    except OSError as e:
        return False, str(e)
    return r.returncode == 0, (r.stdout.splitlines() or [""])[0]


def qemu_major(version):
    try:
        return int(version.split("version", 1)[1].split()[0].split(".")[0])
    except (IndexError, ValueError):
        return 0


# HWCAP / HWCAP2 bits of arm64 Linux (arch/arm64/include/uapi/asm/hwcap.h) and their /proc/cpuinfo names
HWCAP = ["fp", "asimd", "evtstrm", "aes", "pmull", "sha1", "sha2", "crc32", "atomics", "fphp", "asimdhp", "cpuid",
         "asimdrdm", "jscvt", "fcma", "lrcpc", "dcpop", "sha3", "sm3", "sm4", "asimddp", "sha512", "sve", "asimdfhm",
         "dit", "uscat", "ilrcpc", "flagm", "ssbs", "sb", "paca", "pacg"]
HWCAP2 = ["dcpodp", "sve2", "sveaes", "svepmull", "svebitperm", "svesha3", "svesm4", "flagm2", "frint", "svei8mm",
          "svef32mm", "svef64mm", "svebf16", "i8mm", "bf16", "dgh", "rng", "bti", "mte", "ecv", "afp", "rpres",
          "mte3", "sme", "smei16i64", "smef64f64", "smei8i32", "smef16f32", "smeb16f32", "smef32f32", "smefa64",
          "wfxt", "ebf16", "sveebf16", "cssc", "rprfm", "sve2p1", "sme2", "sme2p1", "smei16i32", "smebi32i32",
          "smeb16b16", "smef16f16", "mops", "hbc", "sveb16b16", "lrcpc3", "lse128"]
CPU_PART = {"cortex-a53": ("0x41", "0x0", "0xd03", "0x4"), "cortex-a76": ("0x41", "0x4", "0xd0b", "0x1"),
            "neoverse-n1": ("0x41", "0x4", "0xd0c", "0x1"), "neoverse-n2": ("0x41", "0x0", "0xd49", "0x0")}
AUXV_PROBE = ("import struct\nd=open('/proc/self/auxv','rb').read()\nv=dict(struct.iter_unpack('<QQ',d))\n"
              "print(v.get(16,0), v.get(26,0))")


def cpuinfo(qemu, root, cpu, env):
    """/proc/cpuinfo text for ``cpu``: the feature names of the HWCAP bits QEMU gives a guest under ``-cpu cpu``."""
    r = subprocess.run([qemu, "-cpu", cpu, "-L", root, os.path.join(root, "usr/bin/python3.11"), "-S", "-c",
                        AUXV_PROBE], capture_output=True, text=True, env=env, timeout=300)
    if r.returncode:
        raise SystemExit(f"arm64-check: reading the HWCAP bits under -cpu {cpu} failed: {r.stderr.strip()[-400:]}")
    hw, hw2 = (int(v) for v in r.stdout.split())
    features = [n for i, n in enumerate(HWCAP) if hw >> i & 1] + [n for i, n in enumerate(HWCAP2) if hw2 >> i & 1]
    impl, variant, part, rev = CPU_PART.get(cpu, ("0x41", "0x0", "0xd03", "0x4"))
    block = (f"processor\t: 0\nBogoMIPS\t: 100.00\nFeatures\t: {' '.join(features)}\nCPU implementer\t: {impl}\n"
             f"CPU architecture: 8\nCPU variant\t: {variant}\nCPU part\t: {part}\nCPU revision\t: {rev}\n\n")
    return block, features


def guest_env(root):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "LD_", "QEMU_"))}
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(root, "site-packages"), REPO])
    env["PYTHONNOUSERSITE"] = "1"
    return env


def check_cpu(qemu, version, root, cpu, package, threads, allow=()):
    """device-check of ``package`` under ``-cpu cpu``; returns (verdict, seconds), verdict "PASS", "FAIL" or
    "KNOWN" (outputs differ, and on each runtime that differs the first op that differs is in ``allow``)."""
    env = guest_env(root)
    listed = subprocess.run([qemu, "-cpu", "help"], capture_output=True, text=True).stdout.split()
    if cpu not in listed:
        log(f"{cpu}: this QEMU ({version}) has no -cpu {cpu}; use the next Debian release's (--qemu next)")
        return "FAIL", 0.0
    own = os.path.join(root, "proc", "cpuinfo")
    if qemu_major(version) >= 8 and os.path.exists(own):
        os.unlink(own)  # QEMU >= 8 emulates /proc/cpuinfo itself; a 7.2 run's file must not linger
    if qemu_major(version) < 8:  # QEMU 7.2 shows the guest the host's cpuinfo: give it an ARM one (read via -L)
        os.makedirs(os.path.join(root, "proc"), exist_ok=True)
        text, features = cpuinfo(qemu, root, cpu, env)
        with open(os.path.join(root, "proc", "cpuinfo"), "w") as f:
            f.write(text)
        log(f"{cpu}: ROOT/proc/cpuinfo written, features {' '.join(features)}")
    t0 = time.perf_counter()
    cmd = [qemu, "-cpu", cpu, "-L", root, os.path.join(root, "usr/bin/python3.11"), "-m", "mobileqat.device_check",
           package, "--threads", str(threads), "--runs", "20", "--trace", "--platform-label", f"aarch64 QEMU -cpu {cpu}"]
    log(f"{cpu} ({CPUS.get(cpu, '')}): {' '.join(cmd[:3])} ... device_check")
    import json
    with tempfile.TemporaryDirectory(prefix="mobileqat-arm64-json-") as folder:
        out = os.path.join(folder, "result.json")
        r = subprocess.run(cmd + ["--json", out], env=env, text=True, capture_output=True, timeout=3600)
        sys.stdout.write(r.stdout)
        sys.stderr.write("".join(l + "\n" for l in r.stderr.splitlines() if not l.startswith("INFO: Created")))
        result = json.load(open(out)) if os.path.exists(out) else None
    seconds = time.perf_counter() - t0
    if r.returncode == 0:
        return "PASS", seconds
    if r.returncode != 1 or result is None or result["preprocessing"]["identical"] != result["images"]:
        return "FAIL", seconds
    firsts = {name: ((rr.get("trace") or {}).get("first_difference") or {}).get("op")
              for name, rr in result["runtimes"].items() if rr["identical"] < result["images"]}
    if firsts and all(op in allow for op in firsts.values()):
        log(f"{cpu}: KNOWN difference: first op that differs " + ", ".join(f"{n}: {op}" for n, op in firsts.items())
            + f" (allowed by --allow {' '.join(allow)}); every op before it is bit for bit")
        return "KNOWN", seconds
    return "FAIL", seconds


def twin_line(package):
    """Say what the package's manifest proves on the host: the integer twin vs the golden codes (so codes that
    match the golden ones on aarch64 match the twin's arithmetic too)."""
    import json
    with open(os.path.join(package, "manifest.json")) as f:
        manifest = json.load(f)
    twin = manifest["validation"]["integer_twin"]
    arm = (manifest["golden"].get("machines") or {}).get("aarch64")
    if arm:
        log(f"aarch64 XNNPACK golden codes: {arm['xnnpack']}, from {arm['source']}; they differ from the x86-64 "
            f"codes on {arm['images_differing_from_x86']} of {manifest['golden']['count']} images")
    if "integer_path_error" in twin:
        log(f"integer twin: none ({twin['integer_path_error']}); the golden codes are the x86-64 runtimes' only")
        return
    for name, r in twin.items():
        per_op = r.get("per_op", {})
        log(f"integer twin ({name} arithmetic) vs the golden {name} codes, on the host: {r.get('identical')}/"
            f"{r.get('images')} outputs identical, max {r.get('max_lsb_diff')} LSB; per op "
            f"{per_op.get('ops_compared')}/{per_op.get('of')} ops x {per_op.get('images')} images, max "
            f"{per_op.get('max_lsb_diff')} LSB")


def demo_package(out):
    """A tiny package built on the host (TensorFlow): ``python -m mobileqat.package --demo OUT``."""
    log(f"building a demo package on the host: {out}")
    run([sys.executable, "-m", "mobileqat.package", "--demo", out], env={**os.environ, "PYTHONPATH": REPO})
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--package", help="package folder to check (default: build a tiny demo package)")
    p.add_argument("--cpus", nargs="+", default=list(DEFAULT_CPUS), help="QEMU -cpu models")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--allow", nargs="*", default=[], metavar="OP",
                   help="TFLite ops (e.g. SOFTMAX) whose aarch64 difference is known: a runtime whose first differing "
                        "op is one of them is reported as KNOWN, not a failure")
    p.add_argument("--qemu", choices=("auto", "next", "current"), default="auto",
                   help="QEMU of the next Debian release (10), of the host's (7.2 on Debian 12), or the first that works")
    p.add_argument("--setup-only", action="store_true", help="build the root and fetch QEMU, run nothing")
    args = p.parse_args(argv)
    if platform.machine() not in ("x86_64", "AMD64"):
        log(f"host is {platform.machine()}, not x86-64: running anyway")
    os.makedirs(CACHE, exist_ok=True)
    root = build_root(os.path.join(CACHE, "root"))
    qemu, version = qemu_binary(args.qemu)
    log(f"QEMU: {qemu} ({version})")
    if args.setup_only:
        return 0
    with tempfile.TemporaryDirectory(prefix="mobileqat-arm64-") as tmp:
        package = os.path.abspath(args.package) if args.package else demo_package(os.path.join(tmp, "pkg"))
        results = {}
        twin_line(package)
        for cpu in args.cpus:
            results[cpu] = check_cpu(qemu, version, root, cpu, package, args.threads, tuple(args.allow))
    log("summary: " + ", ".join(f"{cpu} {v} ({s:.0f} s)" for cpu, (v, s) in results.items()))
    return 0 if all(v in ("PASS", "KNOWN") for v, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
