"""Every module of distconv imports on its own, first, in a fresh set of distconv modules
(an import cycle that only works in one order, e.g. ``distconv.planner.calibrate`` before
``distconv.planner.machine``, fails here), with mpi4py and cupy absent."""
import subprocess
import sys
import textwrap

CHECK = textwrap.dedent("""
    import importlib, pkgutil, sys, traceback
    sys.modules["mpi4py"] = None            # mpi4py and cupy cannot be imported
    sys.modules["cupy"] = None
    pkg = sys.argv[1]
    root = importlib.import_module(pkg)
    names = [pkg] + [m.name for m in pkgutil.walk_packages(root.__path__, pkg + ".")]
    bad = []
    for name in names:
        for k in [k for k in sys.modules if k == pkg or k.startswith(pkg + ".")]:
            del sys.modules[k]
        try:
            importlib.import_module(name)
        except ImportError as e:
            if "mpi4py" in str(e) or "cupy" in str(e):
                continue                    # a module that needs MPI or CUDA by design
            bad.append(f"{name}: {type(e).__name__}: {e}")
    print(len(names), "modules")
    print("\\n".join(bad))
    sys.exit(1 if bad else 0)
""")


def _check(pkg, cwd=None):
    return subprocess.run([sys.executable, "-c", CHECK, pkg], capture_output=True, text=True,
                          timeout=240, cwd=cwd)


def test_every_module_imports_first():
    out = _check("distconv")
    assert out.returncode == 0, out.stdout + out.stderr
    assert int(out.stdout.split()[0]) > 50  # the walk saw the whole package


def test_import_check_negative_control(tmp_path):
    """A package whose two modules import each other's names at the top fails the check
    when the second is imported first (the shape of the calibrate/machine cycle)."""
    pkg = tmp_path / "cyc"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "machine.py").write_text("from .calib import calibrate\nMachine = 1\n")
    (pkg / "calib.py").write_text("from .machine import Machine\n\ndef calibrate():\n"
                                  "    return Machine\n")
    out = _check("cyc", cwd=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "cyc.calib: ImportError" in out.stdout
