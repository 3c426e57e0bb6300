"""transformers is optional: the library, its methods and the trainer import without it, and the
adapter says how to get it."""
import subprocess
import sys

BLOCK = "import sys; sys.modules['transformers'] = None; "  # any import of transformers now fails


def run(code):
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True, timeout=120)


def test_library_imports_without_transformers():
    done = run("import lasp2, lasp2.parallel, lasp2.train, lasp2.integrations; print('ok')")
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr


def test_the_adapter_names_the_extra():
    done = run("import lasp2.integrations.transformers")
    assert done.returncode != 0 and "pip install 'lasp2[hf]'" in done.stderr, done.stderr
