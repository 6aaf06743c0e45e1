"""The sandbox, exercised with real child processes and hostile code.

Each test states what a user of ``run_function`` sees. Where a property depends on a mechanism
the platform may lack (a dedicated uid, namespaces), the test asks ``isolation_report`` and
skips with the reason instead of asserting something the sandbox does not promise there.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid

import pytest

from mlflow_genopt import sandbox
from mlflow_genopt.sandbox import SandboxLimits, isolation_report, run_function, run_script

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox tests target Linux")

QUICK = SandboxLimits(timeout_s=5.0, memory_mb=512)


def code(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def new_tag() -> str:
    return "gt" + uuid.uuid4().hex[:10]  # fits the 15 characters of /proc/<pid>/comm


def live_processes_tagged(tag: str, wait_s: float = 2.0) -> list[int]:
    """Non-zombie processes whose name is ``tag``, after giving pending kills a moment."""
    deadline = time.monotonic() + wait_s
    while True:
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as handle:
                    stat = handle.read()
            except OSError:
                continue
            name = stat[stat.index(b"(") + 1 : stat.rindex(b")")].decode(errors="replace")
            state = stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3]
            if name == tag and state != b"Z":
                found.append(int(entry))
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_returns_each_calls_value_and_output_in_order():
    source = code("""
        def add(a, b=0):
            print("adding", a, b)
            return {"sum": a + b, "items": [a, b]}
    """)
    results = run_function(source, "add", [([1], {}), ([2], {"b": 3}), ([10, 20], {})], limits=QUICK)
    assert [r.ok for r in results] == [True, True, True]
    assert [r.value for r in results] == [
        {"sum": 1, "items": [1, 0]},
        {"sum": 5, "items": [2, 3]},
        {"sum": 30, "items": [10, 20]},
    ]
    assert [r.stdout_tail for r in results] == ["adding 1 0\n", "adding 2 3\n", "adding 10 20\n"]
    assert all(r.error is None and r.duration_s >= 0 for r in results)


def test_preamble_imports_are_available_to_the_code():
    results = run_function("def f():\n    return math.sqrt(16)\n", "f", [([], {})], preamble="import math", limits=QUICK)
    assert results[0].value == 4.0


def test_exception_in_one_call_is_reported_and_the_others_still_run():
    source = code("""
        def invert(x):
            if x == 0:
                return undefined_name
            return 1 / x
    """)
    ok1, bad, ok2 = run_function(source, "invert", [([2], {}), ([0], {}), ([4], {})], limits=QUICK)
    assert (ok1.ok, ok1.value, ok2.ok, ok2.value) == (True, 0.5, True, 0.25)
    assert bad.ok is False and bad.value is None
    assert bad.error == "NameError: name 'undefined_name' is not defined"
    assert 'File "generated.py", line 3, in invert' in bad.traceback_tail
    assert "return undefined_name" in bad.traceback_tail
    frames = [line.strip() for line in bad.traceback_tail.splitlines() if line.strip().startswith("File ")]
    assert frames == ['File "generated.py", line 3, in invert']  # sandbox internals are stripped


def test_infinite_loop_times_out_and_leaves_no_process():
    tag = new_tag()
    source = code(f"""
        import os, time
        def spin(kind):
            if kind == "quick":
                return "done"
            with open("/proc/self/comm", "w") as handle:
                handle.write("{tag}")
            if os.fork() == 0:  # a child that would outlive its parent
                os.setsid()
                while True:
                    time.sleep(0.1)
            while True:
                pass
    """)
    limits = SandboxLimits(timeout_s=1.5)
    quick, looping, never = run_function(source, "spin", [(["quick"], {}), (["loop"], {}), (["quick"], {})], limits=limits)
    assert quick.ok and quick.value == "done"
    assert looping.error == "timeout after 1.5s" and not looping.ok
    assert never.error == "timeout after 1.5s" and not never.ok  # the batch shares the deadline
    assert live_processes_tagged(tag) == []


def test_memory_bombs_get_a_memory_error_and_the_parent_is_fine():
    source = code("""
        def bomb(kind):
            if kind == "huge":
                return len(bytearray(50 * 1024**3))
            if kind == "grow":
                hoard = []
                while True:
                    hoard.append(bytearray(10**7))
            return "still alive"
    """)
    limits = SandboxLimits(timeout_s=5.0, memory_mb=256)
    huge, grow, after = run_function(source, "bomb", [(["huge"], {}), (["grow"], {}), (["none"], {})], limits=limits)
    for result in (huge, grow):
        assert not result.ok
        assert result.error.startswith("memory limit 256 MB exceeded")
        assert "MemoryError" in result.traceback_tail
    assert after.ok and after.value == "still alive"


def test_fork_bomb_is_contained_and_every_process_is_killed_afterwards():
    tag = new_tag()
    source = code(f"""
        import os, time
        def bomb(n):
            with open("/proc/self/comm", "w") as handle:
                handle.write("{tag}")
            made = 0
            for _ in range(n):
                try:
                    pid = os.fork()
                except OSError:
                    break
                if pid == 0:
                    os.setsid()  # try to leave the process group
                    time.sleep(60)
                    os._exit(0)
                made += 1
            return made
    """)
    limits = SandboxLimits(timeout_s=5.0, max_processes=16)
    (result,) = run_function(source, "bomb", [([300], {})], limits=limits)
    assert result.ok, result.error
    report = isolation_report()
    if report["privilege"].startswith("dedicated-uid"):
        assert result.value < 16  # RLIMIT_NPROC counts the runner itself too
    elif not (os.geteuid() == 0 and report["privilege"] == "none"):
        assert result.value < 300  # per-user limit, on top of the user's other processes
    assert live_processes_tagged(tag) == []


def test_environment_carries_no_secret_of_the_parent(monkeypatch):
    secrets = {
        "OPENAI_API_KEY": "sk-test-should-not-leak",
        "GITHUB_TOKEN": "ghp-should-not-leak",
        "DB_PASSWORD": "hunter2-should-not-leak",
        "AWS_SECRET_ACCESS_KEY": "aws-should-not-leak",
        "MLFLOW_TRACKING_URI": "http://tracking.invalid",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    source = "import os\ndef env():\n    return {'env': dict(os.environ), 'cwd': os.getcwd()}\n"
    (result,) = run_function(source, "env", [([], {})], limits=QUICK)
    assert result.ok, result.error
    env = result.value["env"]
    assert not set(secrets) & set(env)
    assert not set(secrets.values()) & set(env.values())
    assert not [name for name in env if any(word in name for word in ("KEY", "TOKEN", "SECRET", "PASSWORD", "MLFLOW"))]
    assert env["HOME"] == env["TMPDIR"] == result.value["cwd"]


def test_parent_process_environment_cannot_be_read_through_proc():
    report = isolation_report()
    if report["privilege"] == "none" and report["proc"] == "host":
        pytest.skip("no uid change and no private /proc here: /proc/<parent>/environ is readable")
    source = code("""
        def peek(pid):
            try:
                with open(f"/proc/{pid}/environ", "rb") as handle:
                    return handle.read().decode(errors="replace")
            except OSError as exc:
                return f"refused: {type(exc).__name__}"
    """)
    (result,) = run_function(source, "peek", [([os.getpid()], {})], limits=QUICK)
    assert result.ok, result.error
    assert result.value.startswith("refused: ")


def test_cannot_write_outside_the_scratch_dir():
    if isolation_report()["privilege"] == "none":
        pytest.skip("the code runs as the loop's own user here: it can write wherever the loop can")
    outside = tempfile.mkdtemp(prefix="genopt-test-outside-")
    try:
        os.chmod(outside, 0o755)
        source = code("""
            import os
            def write(outside):
                with open("inside.txt", "w") as handle:  # the scratch dir is the code's own
                    handle.write("fine")
                try:
                    with open(os.path.join(outside, "planted.txt"), "w") as handle:
                        handle.write("should not exist")
                except OSError as exc:
                    return f"refused: {type(exc).__name__}"
                return "written"
        """)
        (result,) = run_function(source, "write", [([outside], {})], limits=QUICK)
        assert result.ok, result.error
        assert result.value == "refused: PermissionError"
        assert os.listdir(outside) == []
    finally:
        os.rmdir(outside)


@pytest.fixture
def tcp_server():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(0.2)
    accepted = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except (socket.timeout, OSError):
                continue
            accepted.append(conn.recv(100))
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    stop.set()
    thread.join(timeout=2)
    server.close()


CONNECT = code("""
    import socket
    def connect(port):
        with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
            conn.sendall(b"hello from the sandbox")
        return "connected"
""")


def test_network_is_blocked_even_to_localhost(tcp_server):
    port, accepted = tcp_server
    (result,) = run_function(CONNECT, "connect", [([port], {})], limits=QUICK)
    assert not result.ok
    expected = {"netns": "OSError: [Errno 101] Network is unreachable",
                "python-guard": "PermissionError: network access is disabled in the sandbox"}
    assert result.error == expected[isolation_report()["network"]]
    time.sleep(0.3)
    assert accepted == []


def test_allow_network_lets_the_same_code_connect(tcp_server):
    port, accepted = tcp_server
    (result,) = run_function(CONNECT, "connect", [([port], {})], limits=SandboxLimits(timeout_s=5.0, allow_network=True))
    assert result.ok, result.error
    deadline = time.monotonic() + 2
    while not accepted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert accepted == [b"hello from the sandbox"]


def test_huge_output_is_truncated_to_its_tail_and_the_parent_survives():
    source = code("""
        import sys
        def shout():
            for i in range(5000):
                sys.stdout.write("x" * 9999 + "\\n")  # 50 MB in all
            print("the end")
            print("warning at the end", file=sys.stderr)
            return "finished"
    """)
    limits = SandboxLimits(timeout_s=5.0, max_output_bytes=100_000)
    (result,) = run_function(source, "shout", [([], {})], limits=limits)
    assert result.ok and result.value == "finished"
    assert result.stdout_tail.endswith("x\nthe end\n")
    assert "bytes truncated" in result.stdout_tail
    assert len(result.stdout_tail) <= 100_000 + 100
    assert result.stderr_tail == "warning at the end\n"


def test_non_utf8_output_is_replaced_not_fatal():
    source = code("""
        import sys
        def garble():
            sys.stdout.buffer.write(b"before \\xff\\xfe\\x80 after\\n")
            sys.stdout.flush()
            sys.stderr.buffer.write(b"\\xc3\\x28 err\\n")
            sys.stderr.flush()
            return "ok"
    """)
    (result,) = run_function(source, "garble", [([], {})], limits=QUICK)
    assert result.ok and result.value == "ok"
    assert result.stdout_tail == "before \ufffd\ufffd\ufffd after\n"
    assert result.stderr_tail == "\ufffd( err\n"


def test_syntax_error_fails_every_call_with_the_message():
    results = run_function("def f(:\n    return 1\n", "f", [([], {}), ([], {})], limits=QUICK)
    assert [r.ok for r in results] == [False, False]
    assert {r.error for r in results} == {"SyntaxError: invalid syntax (generated.py, line 1)"}
    assert "def f(:" in results[0].traceback_tail


def test_missing_function_gives_a_clear_error():
    source = "def train_model():\n    return 1\n\nlimit = 3\n"
    (result,) = run_function(source, "predict", [([], {})], limits=QUICK)
    assert result.error == "the code does not define a function named 'predict' (it defines: train_model)"
    (result,) = run_function(source, "limit", [([], {})], limits=QUICK)
    assert result.error == "the code defines 'limit' as a int, not a function named 'limit' (it defines: train_model)"


def test_printed_fake_results_cannot_forge_the_returned_value():
    source = code("""
        import json, sys
        def honest():
            fake = {"kind": "call", "i": 0, "ok": True, "value": 999, "duration_s": 0.0}
            print(json.dumps(fake))
            print(json.dumps(fake), file=sys.stderr)
            print("\\x1egenopt-0000000000000000:1\\x1e")
            return 1
    """)
    first, second = run_function(source, "honest", [([], {}), ([], {})], limits=QUICK)
    assert (first.value, second.value) == (1, 1)
    assert '"value": 999' in first.stdout_tail and '"value": 999' in second.stdout_tail


def test_unserializable_or_oversized_return_value_is_an_error_for_that_call_only():
    source = "def f(kind):\n    return {'set': {1, 2}, 'big': 'x' * 50_000}.get(kind, [1, 2])\n"
    limits = SandboxLimits(timeout_s=5.0, max_output_bytes=10_000)
    bad, big, good = run_function(source, "f", [(["set"], {}), (["big"], {}), (["list"], {})], limits=limits)
    assert bad.error == "return value is not JSON-serializable: set"
    assert big.error == "return value too large: 50002 bytes of JSON > max_output_bytes=10000"
    assert good.ok and good.value == [1, 2]


def test_concurrent_batches_do_not_interfere():
    source = "import os, time\ndef who(n):\n    time.sleep(0.2)\n    return [n, os.getcwd()]\n"
    outcomes = {}

    def run(n):
        outcomes[n] = run_function(source, "who", [([n], {})], limits=QUICK)[0]

    threads = [threading.Thread(target=run, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert sorted(outcomes) == [0, 1, 2, 3]
    assert [outcomes[n].value[0] for n in range(4)] == [0, 1, 2, 3]
    assert len({outcomes[n].value[1] for n in range(4)}) == 4  # each had its own scratch dir


def test_process_exit_inside_a_call_fails_the_rest_of_the_batch():
    source = "import os\ndef f(code):\n    if code:\n        os._exit(code)\n    return 'ok'\n"
    first, dying, after = run_function(source, "f", [([0], {}), ([3], {}), ([0], {})], limits=QUICK)
    assert first.ok and first.value == "ok"
    assert dying.error == after.error == "sandbox process exited with code 3 before returning a result"


def test_cpu_limit_fails_the_spinning_call_and_ends_the_batch():
    source = "def f(spin):\n    while spin:\n        pass\n    return 'idle'\n"
    limits = SandboxLimits(timeout_s=5.0, cpu_s=1)
    idle, spinning, after = run_function(source, "f", [([False], {}), ([True], {}), ([False], {})], limits=limits)
    assert idle.ok and idle.value == "idle"
    assert spinning.error == after.error == "cpu time limit 1s exceeded"
    assert 'File "generated.py", line 2, in f' in spinning.traceback_tail


def test_crash_of_the_interpreter_is_reported_as_a_signal():
    source = "import ctypes\ndef f():\n    return ctypes.string_at(0)\n"
    (result,) = run_function(source, "f", [([], {})], limits=QUICK)
    assert result.error == "killed by signal 11 (SIGSEGV)"


def test_files_are_in_the_scratch_dir_which_is_removed_unless_kept():
    source = code("""
        import os
        def read(name):
            with open(name) as handle:
                return {"text": handle.read(), "cwd": os.getcwd()}
    """)
    files = {"data/train.csv": "a,b\n1,2\n", "blob.bin": b"\x00\x01"}
    (result,) = run_function(source, "read", [(["data/train.csv"], {})], files=files, limits=QUICK)
    assert result.value["text"] == "a,b\n1,2\n"
    assert result.workdir is None and not os.path.exists(result.value["cwd"])

    (kept,) = run_function(source, "read", [(["blob.bin"], {})], files=files, limits=QUICK, workdir_keep=True)
    try:
        assert kept.workdir == kept.value["cwd"] and os.path.isfile(os.path.join(kept.workdir, "data", "train.csv"))
    finally:
        import shutil

        shutil.rmtree(kept.workdir)


def test_run_script_reports_output_and_exceptions():
    ok = run_script("print('hello')\n", limits=QUICK)
    assert (ok.ok, ok.value, ok.stdout_tail) == (True, None, "hello\n")
    bad = run_script("print('before')\nraise ValueError('nope')\n", limits=QUICK)
    assert (bad.ok, bad.error, bad.stdout_tail) == (False, "ValueError: nope", "before\n")
    assert 'File "generated.py", line 2, in <module>' in bad.traceback_tail


def test_scientific_stack_imports_inside_the_sandbox():
    pytest.importorskip("numpy")
    source = code("""
        import numpy as np
        def mean(values):
            import json, statistics  # lazily imported stdlib must be readable after the uid change
            return float(np.mean(values))
    """)
    (result,) = run_function(source, "mean", [([[1, 2, 3, 4]], {})], limits=SandboxLimits(timeout_s=5.0))
    assert result.ok, (result.error, result.stderr_tail)
    assert result.value == 2.5


def test_isolation_report_shows_every_strongest_mechanism_as_root_on_linux():
    """The usual container (Linux, root), and this project's CI machines (README): all of the
    strongest mechanisms are in force, and the module constants say so."""
    if os.geteuid() != 0:
        pytest.skip("without root there is no uid change (privilege 'none'); the strongest set needs root")
    strongest = {"network": "netns", "privilege": "dedicated-uid", "processes": "pid-namespace", "proc": "private"}
    report = isolation_report()
    assert report == strongest, "root without CAP_SYS_ADMIN (or with seccomp blocking unshare) gets the fallbacks"
    constants = {"network": sandbox.NETWORK_ISOLATION, "privilege": sandbox.PRIVILEGE_DROP,
                 "processes": sandbox.PROCESS_CONTAINMENT, "proc": sandbox.PROC_VISIBILITY}
    assert constants == strongest
    with pytest.raises(AttributeError, match="NO_SUCH_CONSTANT"):
        sandbox.NO_SUCH_CONSTANT  # noqa: B018 - only the four isolation constants are lazy


@pytest.mark.parametrize("disabled", [{"namespaces"}, {"namespaces", "uid"}, {"mount"}])
def test_fallback_mechanisms_still_block_the_network_and_kill_leftovers(monkeypatch, tcp_server, disabled):
    if os.geteuid() != 0:
        pytest.skip("the fallbacks exercised here are the ones chosen when running as root")
    monkeypatch.setattr("mlflow_genopt.sandbox._run._DISABLED_MECHANISMS", frozenset(disabled))
    port, accepted = tcp_server
    tag = new_tag()
    source = code(f"""
        import os, socket, time
        def escape(port):
            with open("/proc/self/comm", "w") as handle:
                handle.write("{tag}")
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:  # a daemonized grandchild
                    time.sleep(60)
                os._exit(0)
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return "connected"
            except OSError as exc:
                return type(exc).__name__
    """)
    (result,) = run_function(source, "escape", [([port], {})], limits=QUICK)
    assert result.ok, result.error
    assert result.value in {"OSError", "PermissionError"}
    assert accepted == []
    assert live_processes_tagged(tag) == []


def test_bad_arguments_are_rejected_before_anything_runs():
    with pytest.raises(ValueError, match="identifier"):
        run_function("", "not a name", [([], {})])
    with pytest.raises(TypeError, match=r"calls\[0\]"):
        run_function("", "f", [([], [])])
    with pytest.raises(TypeError, match="JSON-serializable"):
        run_function("", "f", [([object()], {})])
    with pytest.raises(ValueError, match="relative paths"):
        run_function("", "f", [([], {})], files={"../escape.txt": "x"})
    with pytest.raises(ValueError, match="timeout_s"):
        SandboxLimits(timeout_s=0)
    with pytest.raises(TypeError, match="limits must be a SandboxLimits, got dict"):
        run_function("", "f", [([], {})], limits={"timeout_s": 1.0})
    with pytest.raises(TypeError, match="expose_packages must be a sequence"):
        run_function("", "f", [([], {})], expose_packages="mypkg")
    with pytest.raises(ValueError, match="expose_packages entries"):
        run_script("", expose_packages=["my-pkg"])
    assert run_function("", "f", []) == []


def test_trusted_preamble_can_import_the_case_studies_wherever_they_are_installed():
    """Editable installs map genopt_projects to the checkout through an import hook, not
    sys.path; a checkout under a 0700 directory (mktemp -d) must still be importable."""
    import genopt_projects

    from mlflow_genopt.sandbox._isolation import _package_dirs

    assert os.path.dirname(genopt_projects.__file__) in _package_dirs(["genopt_projects"])
    (result,) = run_function(
        "def f(answer, target):\n    return is_correct(answer, target)\n", "f",
        [(["(A)", "a"], {})],
        preamble="from genopt_projects.bbeh.scoring import is_correct\n",  # its package imports mlflow_genopt
        limits=SandboxLimits(timeout_s=20),
        expose_packages=("genopt_projects", "mlflow_genopt"),
    )
    assert result.ok and result.value is True


def test_only_the_packages_the_caller_names_are_exposed_from_a_checkout_under_a_0700_directory(tmp_path):
    """Re-runs the sandbox with this checkout's parent turned into a ``0700`` directory (a tmpfs
    in a private mount namespace, the checkout bind-mounted back): the dedicated uid can import
    an import-hook package from it exactly when the caller passes it in ``expose_packages``."""
    import genopt_projects

    package_dir = os.path.realpath(os.path.dirname(genopt_projects.__file__))
    checkout = os.path.dirname(package_dir)
    parent = os.path.dirname(checkout)
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("mount") is None:
        pytest.skip("needs root and util-linux unshare/mount to build a private 0700 view of the checkout")
    if isolation_report()["privilege"] != "dedicated-uid":
        pytest.skip("no dedicated uid here: every path the loop can read is readable to the code")
    if importlib.machinery.PathFinder.find_spec("genopt_projects", sys.path) is not None:
        pytest.skip("genopt_projects is found through sys.path here, not through an editable install's import hook")
    if parent == "/":
        pytest.skip("the checkout is at the top level: there is no parent directory to hide it under")
    hidden = [p for p in (sys.prefix, sys.base_prefix, sys.executable, os.path.realpath(sys.executable),
                          str(tmp_path), tempfile.gettempdir())
              if p.startswith(parent + "/") and not p.startswith(checkout + "/")]
    if hidden:
        pytest.skip(f"{hidden} would be hidden by a tmpfs over {parent}")
    probe = code("""
        import json
        from mlflow_genopt.sandbox import SandboxLimits, run_function
        errors = {}
        for key, packages in (("named", ["genopt_projects"]), ("not named", [])):
            (result,) = run_function("def f():\\n    return 1\\n", "f", [([], {})],
                                     preamble="import genopt_projects\\n", limits=SandboxLimits(timeout_s=30),
                                     expose_packages=packages)
            errors[key] = result.error
        print(json.dumps(errors))
    """)
    hold = tmp_path / "checkout"
    hold.mkdir()
    shell = ('mount --bind "$1" "$2" && mount -t tmpfs -o mode=700 tmpfs "$3" && mkdir -p "$1" '
             '&& mount --bind "$2" "$1" && cd "$1" && exec "$4" -c "$5"')
    done = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", shell, "sh",
                           checkout, str(hold), parent, sys.executable, probe],
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0 and "unshare" in done.stderr and "Operation not permitted" in done.stderr:
        pytest.skip(f"no mount namespace for the test itself: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {
        "named": None, "not named": "preamble failed: ModuleNotFoundError: No module named 'genopt_projects'"}
