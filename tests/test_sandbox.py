"""The sandbox executor against hostile programs: each must be contained, checked from this side (the host): a
canary file unchanged, listeners that heard nothing, a victim process still alive, no process left over, the next
job still right. Everything attacked is open to the job's uid and gid (nobody) by plain permissions (the premise
test proves it), so only the sandbox's own confinement can stop it. Harmless controls must still pass."""

from __future__ import annotations

import hashlib, json, os, resource, secrets, shutil, socket, string, subprocess, sys, tempfile, textwrap, time
from pathlib import Path

import pytest

from arena.plugins.executors.sandbox import SandboxExecutor, SandboxOptions
from arena.values import value_text
from arena.types import Job

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox confines on Linux only")

TIMEOUT, MAX_STDOUT = 2.0, 4096
MARKER = "sbx" + secrets.token_hex(4)  # 11 characters: fits a process's comm name
NOBODY = {"user": 65534, "group": 65534, "extra_groups": []} if os.getuid() == 0 else {}  # the job's uid and gid
CONTROL = Job(program="def f(n):\n    return sum(range(n))", inputs=["10", "100"])
PRELUDE = ("import os, sys, time, json, codecs, signal, socket, ctypes, builtins, importlib, subprocess, threading\n"
           "import multiprocessing, urllib.request\nlibc = ctypes.CDLL(None, use_errno=True)\n"
           "codecs.register(lambda name: codecs.lookup('utf-8') if name == 'idna' else None)  # the stdlib's may be"
           " unreadable\ndef mark():\n    libc.prctl(15, $marker.encode(), 0, 0, 0)  # PR_SET_NAME: visible in /proc\n")
CASES: list[tuple[str, str]] = []  # (category, id) of every hostile case


def hostile(category: str, table: dict, names: str = "body"):
    CASES.extend((category, case) for case in table)
    return pytest.mark.parametrize(names, list(table.values()), ids=list(table))


def make(**kw) -> SandboxExecutor:
    return SandboxExecutor(SandboxOptions(**{"workers": 2, "timeout": TIMEOUT, "memory_mb": 256, **kw}))


@pytest.fixture(scope="module")
def ex():
    executor = make()
    executor.run([CONTROL, CONTROL])  # both workers up before the first hostile case
    yield executor
    executor.close()


def _procs() -> dict[int, tuple[int, list[str], str]]:
    """pid -> (ppid, argv, the comm names of its threads), for every process on the machine."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            comms = " ".join(Path(f"/proc/{pid}/task/{t}/comm").read_text() for t in os.listdir(f"/proc/{pid}/task"))
        except (OSError, IndexError):
            continue
        out[int(pid)] = (ppid, argv, comms)
    return out


def workers() -> dict[int, str]:
    """This process's worker launchers -> their scratch folders (from the limits on their command line)."""
    return {pid: json.loads(argv[argv.index(arg) + 1])["scratch"] for pid, (ppid, argv, _) in _procs().items()
            if ppid == os.getpid() for arg in argv if arg.endswith("sandbox_worker.py")}


def leftovers() -> list[str]:
    """Processes that must not exist between jobs: any naming MARKER anywhere on the machine, and any descendant of
    this process three levels down (test -> worker launcher -> server -> a job or its orphans)."""
    procs, depth = _procs(), {os.getpid(): 0}
    for _ in range(8):
        depth.update({pid: depth[p[0]] + 1 for pid, p in procs.items() if p[0] in depth and pid not in depth})
    return [f"{pid}: {' '.join(argv)} [{comms.strip()}]" for pid, (_, argv, comms) in procs.items()
            if MARKER in " ".join(argv) + comms or depth.get(pid, 0) >= 3]


def _received(sock) -> bool:
    try:
        sock.recv(100) if sock.type == socket.SOCK_DGRAM else sock.accept()[0].close()
        return True
    except BlockingIOError:
        return False


class World:
    """What a job could harm, each open to uid/gid nobody by its permissions: a world-writable canary in a
    world-writable folder, a 0o644 secret file in a 0o755 folder, TCP/UDP/Unix/abstract listeners, and a victim
    process of uid nobody with the secret in its environment."""

    def __init__(self):
        self.secret = secrets.token_hex(16)
        self.dir = Path(tempfile.mkdtemp(prefix=f"{MARKER}-"))
        self.canary, private = self.dir / "canary", self.dir / "private"
        private.mkdir()
        self.canary.write_text("original")
        (private / "secret.txt").write_text(self.secret)
        for path, mode in ((private / "secret.txt", 0o644), (private, 0o755), (self.canary, 0o777), (self.dir, 0o777)):
            os.chmod(path, mode)
        self.tcp, self.udp = socket.socket(), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.unix, self.abstract = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
        for sock, address in ((self.tcp, ("127.0.0.1", 0)), (self.unix, str(self.dir / "sock")),
                              (self.abstract, f"\0{MARKER}"), (self.udp, ("127.0.0.1", 0))):
            sock.bind(address)
            sock.setblocking(False)
            if sock is not self.udp:
                sock.listen()
        os.chmod(self.dir / "sock", 0o777)
        self.victim = subprocess.Popen(["sleep", "600"], env={"ARENA_TEST_SECRET": self.secret}, **NOBODY)
        self.values = {"marker": MARKER, "dir": str(self.dir), "canary": str(self.canary), "victim": self.victim.pid,
                       "port": self.tcp.getsockname()[1], "uport": self.udp.getsockname()[1],
                       "usock": str(self.dir / "sock"), "asock": f"\0{MARKER}", "tmpfile": f"/tmp/{MARKER}-tmp",
                       "secretfile": str(private / "secret.txt"), "testpid": os.getpid(), "testpgid": os.getpgid(0)}
        self.before = self.snapshot()

    def program(self, body: str) -> str:
        text = body if "def f(" in body else "def f():\n" + textwrap.indent(body, "    ")
        return string.Template(PRELUDE + text).substitute({k: repr(v) for k, v in self.values.items()})

    def snapshot(self) -> dict:
        """Every entry of the canary's folder: mode, times, content, extended attributes."""
        state = {}
        for path in [self.dir, *sorted(self.dir.rglob("*"))]:
            st = path.lstat()
            state[str(path)] = (st.st_mode, st.st_mtime_ns, st.st_ctime_ns,
                                path.read_bytes() if path.is_file() and not path.is_symlink() else None,
                                {k: os.getxattr(path, k, follow_symlinks=False)
                                 for k in os.listxattr(path, follow_symlinks=False)})
        return state

    def heard(self) -> list[str]:
        """The listeners that got a connection or a datagram."""
        return [name for name, sock in (("tcp", self.tcp), ("unix", self.unix), ("abstract", self.abstract),
                                        ("udp", self.udp)) if _received(sock)]


@pytest.fixture
def world():
    w = World()
    yield w
    w.victim.kill()
    w.victim.wait()
    for sock in (w.tcp, w.udp, w.unix, w.abstract):
        sock.close()
    for path in [*Path("/tmp").glob(f"{MARKER}*"), *Path("/dev/shm").glob(f"{MARKER}*")]:  # a failed case's harm
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    for line in leftovers():  # and its processes, so that the next case starts clean
        os.kill(int(line.split(":")[0]), 9)


def run(ex, world, body, inputs=("",)):
    """Runs one hostile job; returns its Execution and the seconds this side waited for it."""
    start = time.monotonic()
    [result] = ex.run([Job(program=world.program(body), inputs=list(inputs))])
    return result, time.monotonic() - start


def assert_contained(ex, world, result):
    """The checks every hostile case shares, all made from this side."""
    assert world.snapshot() == world.before, "a file outside the scratch folder was changed, created or deleted"
    stray = [f"{d}/{n}" for d in ("/tmp", "/dev/shm") for n in os.listdir(d)
             if n.startswith(MARKER) and f"{d}/{n}" != str(world.dir)]
    assert not stray, "files were created outside the scratch folder"
    assert world.heard() == [], "a listener of this process was reached"
    assert world.victim.poll() is None, "the victim process (uid nobody) was killed"
    os.kill(os.getppid(), 0)  # this process's parent lives (and this process evidently does)
    assert leftovers() == [], "processes survived the job"
    assert world.secret not in repr(result), "the secret reached the job"
    assert [r.outputs for r in ex.run([CONTROL, CONTROL])] == [["45", "4950"]] * 2, "the executor stopped working"


# -- 1. files outside the scratch folder ----------------------------------------------------------------------
@hostile("files", {
    "write-canary": "open($canary, 'w').write('pwned')",
    "append-canary": "open($canary, 'a').write('pwned')",
    "truncate-canary": "os.truncate($canary, 0)",
    "delete-canary": "os.remove($canary)",
    "rename-canary": "os.rename($canary, $canary + '.moved')",
    "create-beside-canary": "open($dir + '/new', 'w').write('pwned')",
    "mkdir-beside-canary": "os.mkdir($dir + '/newdir')",
    "mkfifo-beside-canary": "os.mkfifo($dir + '/fifo')",
    "bind-socket-beside-canary": "socket.socket(socket.AF_UNIX).bind($dir + '/s')",
    "write-tmp": "open($tmpfile, 'w').write('pwned')",
    "write-dev-shm": "open('/dev/shm/' + $marker, 'w').write('pwned')",
    "relative-dotdot": "open('../' + $marker + '-rel', 'w').write('pwned')",
    "chdir-then-relative": "os.chdir('/tmp')\nopen($marker + '-cd', 'w').write('pwned')",
    "symlink-to-canary": "os.symlink($canary, 'link')\nopen('link', 'w').write('pwned')",
    "symlink-to-folder": "os.symlink($dir, 'd')\nopen('d/new', 'w').write('pwned')",
    "hardlink-canary": "os.link($canary, 'hard')\nopen('hard', 'w').write('pwned')",
    "rename-scratch-file-out": "open('x', 'w').write('pwned')\nos.rename('x', $dir + '/moved')",
    "touch-canary-times": "os.utime($canary)",
    "setxattr-canary": "os.setxattr($canary, 'user.pwned', b'pwned')",
    "chmod-canary": "os.chmod($canary, 0o644)",
    "chmod-folder": "os.chmod($dir, 0o700)",
})
def test_files_outside_the_scratch_folder_stay_untouched(ex, world, body):
    """Writes, deletes, renames, links and metadata changes on a world-writable canary, in /tmp and /dev/shm."""
    result, _ = run(ex, world, body)
    assert_contained(ex, world, result)


# -- 2. secrets -----------------------------------------------------------------------------------------------
@pytest.fixture
def secret_ex(world, monkeypatch):
    """A fresh executor started after this process put the secret in its own environment."""
    monkeypatch.setenv("ARENA_TEST_SECRET", world.secret)
    executor = make(workers=1)
    yield executor
    executor.close()


BASHRC = Path.home() / ".bashrc"


@hostile("secrets", {
    "os-environ": "return dict(os.environ)",
    "posix-environ": "return dict(importlib.import_module('posix').environ)",
    "proc-self-environ": "return open('/proc/self/environ', 'rb').read()",
    "proc-parent-environ": "return open(f'/proc/{os.getppid()}/environ', 'rb').read()",
    "proc-1-environ": "return open('/proc/1/environ', 'rb').read()",
    "proc-test-environ": "return open(f'/proc/{$testpid}/environ', 'rb').read()",
    "proc-victim-environ": "return open(f'/proc/{$victim}/environ', 'rb').read()",
    "secret-file": "return open($secretfile).read()",
    "secret-file-via-symlink": "os.symlink($secretfile, 'l')\nreturn open('l').read()",
    "home-bashrc": f"return open({str(BASHRC)!r}).read()",
})
def test_secrets_stay_unreadable(secret_ex, world, body):
    """arena's environment and a same-uid process's, a 0o644 secret file, the home folder."""
    result, _ = run(secret_ex, world, body)
    if BASHRC.is_file():
        assert value_text(BASHRC.read_text()) not in result.outputs
    assert_contained(secret_ex, world, result)


# -- 3. network -----------------------------------------------------------------------------------------------
@hostile("network", {
    "tcp-to-test-listener": "socket.create_connection(('127.0.0.1', $port), timeout=0.5).sendall(b'x')",
    "udp-to-test-listener": "socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', $uport))",
    "unix-socket-to-test-listener": "s = socket.socket(socket.AF_UNIX)\ns.connect($usock)\ns.sendall(b'x')",
    "abstract-socket-to-test": "s = socket.socket(socket.AF_UNIX)\ns.connect($asock)\ns.sendall(b'x')",
    "urllib-to-test-listener": "urllib.request.urlopen(f'http://127.0.0.1:{$port}/', timeout=0.5).read()",
    "tcp-1.1.1.1-53": "socket.create_connection(('1.1.1.1', 53), timeout=0.5).sendall(b'x')",
    "udp-1.1.1.1-53": "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.connect(('1.1.1.1', 53))\ns.send(b'x')",
    "getaddrinfo": "return socket.getaddrinfo($marker + '.example.com', 80)",
    "getaddrinfo-localhost": "return socket.getaddrinfo('localhost', $port)",
    "tcp-bind-listen": "s = socket.socket()\ns.bind(('0.0.0.0', 0))\ns.listen()",
})
def test_network_is_cut(ex, world, body):
    """Connections to this process's own listeners and to the internet: each fails, at the network call."""
    result, _ = run(ex, world, body)
    assert result.outputs == [None], "a network call succeeded"
    assert not any(e in result.errors[0] for e in ("ImportError", "LookupError")), "failed before the network call"
    assert_contained(ex, world, result)


# -- 4. processes ---------------------------------------------------------------------------------------------
@hostile("processes", {
    "fork-loop": "for _ in range(10000):\n    if os.fork() == 0:\n        mark()\n        time.sleep(100)",
    "fork-bomb": "while True:\n    os.fork()",
    "libc-fork": "if libc.fork() == 0:\n    mark()\n    time.sleep(100)",
    "raw-clone-syscall": "if libc.syscall(56, 17, 0, 0, 0, 0) == 0:\n    mark()\n    time.sleep(100)",
    "popen-sleep": "subprocess.Popen(['sh', '-c', 'sleep 100; : ' + $marker])",
    "os-system-background": "os.system('sleep 100 & : ' + $marker)",
    "posix-spawn": "os.posix_spawn('/bin/sh', ['sh', '-c', 'sleep 100; : ' + $marker], {})",
    "multiprocessing": "multiprocessing.Process(target=time.sleep, args=(100,)).start()",
})
def test_no_process_is_created_or_survives(ex, world, body):
    """Forks, spawns and fork bombs: none starts (RLIMIT_NPROC=1) or outlives the call, and the call returns fast."""
    result, waited = run(ex, world, body)
    assert waited < 1.5
    assert_contained(ex, world, result)


# -- 5. memory ------------------------------------------------------------------------------------------------
@hostile("memory", {
    "huge-string": "return len('x' * 10**10)",
    "growing-list": "chunks = []\nwhile True:\n    chunks.append(bytearray(10**6))",
    "bytearray-8gib": "return len(bytearray(2**33))",
    "ctypes-buffer-8gib": "return len(ctypes.create_string_buffer(2**33))",
    "dict-bomb": "return len({i: i for i in range(10**9)})",
})
def test_memory_bombs_fail_inside_the_job(ex, world, body):
    """Allocations past memory_mb fail in the job (or kill it) and this process's memory does not grow."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result, waited = run(ex, world, body)
    assert not result.ok and waited < TIMEOUT + 3
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 64 << 10  # KiB
    assert_contained(ex, world, result)


# -- 6. time --------------------------------------------------------------------------------------------------
@hostile("time", {
    "busy-loop": "while True:\n    pass",
    "sleep-100": "time.sleep(100)",
    "signal-pause": "signal.pause()",
    "busy-loop-at-load": "while True:\n    pass\ndef f():\n    return 1",
    "catch-everything-loop": "while True:\n    try:\n        while True:\n            pass\n"
                             "    except BaseException:\n        pass\n    finally:\n        continue",
    "ignore-sigxcpu-loop": "signal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n    pass",
    "close-report-pipe-then-sleep": "os.closerange(3, 1024)\ntime.sleep(100)",
})
def test_runaway_jobs_time_out(ex, world, body):
    """Loops and sleeps end as "timeout" within the wall-clock limit, however the program hides from it."""
    result, waited = run(ex, world, body)
    assert result.status == "timeout", result
    assert waited < TIMEOUT + 3 and result.seconds < TIMEOUT + 3
    assert_contained(ex, world, result)


# -- 7. output ------------------------------------------------------------------------------------------------
@hostile("output", {
    "print-100mb": "for _ in range(100):\n    print('x' * 10**6)",
    "os-write-stdout-100mb": "for _ in range(100):\n    try:\n        os.write(1, b'x' * 10**6)\n"
                             "    except OSError:\n        pass\nreturn 1",
    "return-huge-string": "return 'x' * 10**6",
    "return-long-list": "return [str(i) for i in range(10**5)]",
    "huge-file-in-scratch": "open('big', 'wb').write(b'x' * 10**8)",
    "many-files-in-scratch": "for i in range(10**6):\n    open(f'f{i}', 'wb').write(b'x' * 2**20)",
})
def test_output_is_capped(ex, world, body):
    """Printed output is cut to max_stdout_bytes, long values are refused, files stop at file_size_mb, and the
    scratch folder does not fill the disk."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result, waited = run(ex, world, body)
    assert len(result.stdout) <= MAX_STDOUT and waited < TIMEOUT + 3
    assert all(o is None or len(o) <= 10_000 for o in result.outputs)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 64 << 10
    for scratch in workers().values():
        sizes = [p.stat().st_size for p in Path(scratch).rglob("*") if p.is_file()]
        assert max(sizes, default=0) <= 1 << 20, "a file passed the file-size limit"
        assert sum(sizes) <= 64 << 20, f"the job left {sum(sizes) >> 20} MiB in its scratch folder"
    assert_contained(ex, world, result)


# -- 8. signals -----------------------------------------------------------------------------------------------
@hostile("signals", {
    "kill-parent": "os.kill(os.getppid(), 9)",
    "kill-pid-1": "os.kill(1, 9)",
    "killpg-own-group": "os.killpg(0, 9)",
    "kill-minus-1": "os.kill(-1, 9)",
    "sigterm-test-process": "os.kill($testpid, 15)",
    "sigkill-test-process": "os.kill($testpid, 9)",
    "killpg-test-group": "os.killpg($testpgid, 9)",
    "sigkill-victim-same-uid": "os.kill($victim, 9)",
    "pidfd-victim": "fd = libc.syscall(434, $victim, 0)\nassert libc.syscall(424, fd, 9, None, 0) == 0",
    "kill-every-pid": "for pid in range(2, 100000):\n    try:\n        os.kill(pid, 9)\n    except OSError:\n"
                      "        pass\nreturn 1",
})
def test_signals_reach_nothing_outside(ex, world, body):
    """Signals to the worker, pid 1, this test process and its group, and a process of the same uid nobody."""
    before = workers()
    result, _ = run(ex, world, body)
    assert workers() == before, "a worker process was killed (and replaced)"
    assert_contained(ex, world, result)


# -- 9. threads and children that outlive the call ------------------------------------------------------------
LATE = "mark()\ntime.sleep(1)\nopen($marker + '-late', 'w').write('late')\ntime.sleep(100)\n"


@hostile("outlive", {
    "thread": "t = threading.Thread(target=lambda: (mark(), time.sleep(100)))\nt.start()\nreturn t.is_alive()",
    "double-fork-setsid-daemon": "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                                 + textwrap.indent(LATE, " " * 8) + "    os._exit(0)\nreturn 1",
    "daemon-without-pdeathsig": "libc.prctl(1, 0, 0, 0, 0)  # no kill on parent death\nif os.fork() == 0:\n"
                                + textwrap.indent(LATE, " " * 4) + "return 1",
})
def test_nothing_outlives_the_call(ex, world, body):
    """A thread or a daemon that would write to the scratch folder a second after the call: it never does."""
    result, _ = run(ex, world, body)
    time.sleep(1.5)
    assert not [s for s in workers().values() if (Path(s) / f"{MARKER}-late").exists()], "a daemon wrote late"
    assert_contained(ex, world, result)


# -- 10. fooling the checker ----------------------------------------------------------------------------------
FAKE = ("class Fake(int):\n    __repr__ = __str__ = lambda self: '6'\n    __eq__ = lambda self, other: True\n"
        "    __hash__ = int.__hash__\n")


@hostile("fooling", {
    "eq-always-true": ("class A:\n    __eq__ = lambda self, other: True\n    __repr__ = lambda self: '6'\n"
                       "def f(x):\n    return A()", "6"),
    "int-subclass-fake-repr": (FAKE + "def f(x):\n    return Fake(x)", "6"),
    "fake-inside-list": (FAKE + "def f(x):\n    return [Fake(x)]", "[6]"),
    "fake-dict-key": (FAKE + "def f(x):\n    return {Fake(x): 1}", "{6: 1}"),
    "str-subclass": ("class S(str):\n    __repr__ = lambda self: '6'\ndef f(x):\n    return S(x)", "6"),
}, "body, claim")
def test_values_cannot_lie_about_themselves(ex, world, body, claim):
    """f(5) returns 5 dressed up as 6: value_text refuses it rather than report the text it claims."""
    result, _ = run(ex, world, body, inputs=["5"])
    assert result.outputs == [None] and "Unsupported" in result.errors[0] and claim not in result.outputs
    assert_contained(ex, world, result)


FORGED = {"load_error": None, "outputs": ["'forged'"], "errors": [None]}
FORGE_FDS = (f"data = json.dumps({FORGED!r}).encode()\nfor fd in range(3, 21):\n    try:\n"
             "        os.write(fd, len(data).to_bytes(4, 'big') + data)\n        os.write(fd, data)\n"
             "    except OSError:\n        pass\n")


@hostile("fooling", {
    "sys-exit-at-load": "sys.exit(0)\ndef f():\n    return 1",
    "sys-exit-in-call": "sys.exit(0)",
    "os-exit-before-report": "os._exit(0)",
    "fake-report-on-stdout": f"print(json.dumps({FORGED!r}))\nsys.stdout.flush()\nreturn 'honest'",
    "forged-report-on-fds": FORGE_FDS + "os._exit(0)",
    "forged-report-then-return": FORGE_FDS + "return 'honest'",
    "patch-builtins-repr": "builtins.repr = lambda v: \"'forged'\"\nreturn 'honest'",
    "patch-builtins-type": "builtins.type = lambda v: str\nreturn 'honest'",
    "patch-json-dumps": f"json.dumps = lambda r: {json.dumps({**FORGED, 'outputs': ['1', '2']})!r}\nreturn 'honest'",
    "patch-worker-value-text": "sys.modules['__main__'].value_text = lambda v, d=0: \"'forged'\"\nreturn 'honest'",
    "patch-os-exit": "os._exit = lambda code: None\nreturn 'honest'",
})
def test_the_parents_comparison_cannot_be_fooled(ex, world, body):
    """The job should return a value only this side can compute: forged reports, patched reporting code and early
    exits never produce its text, and a report printed on stdout is never read as one."""
    expected = value_text(hashlib.sha256(world.secret.encode()).hexdigest())
    result, _ = run(ex, world, body)
    assert expected not in result.outputs and not (result.ok and result.outputs == [expected])
    if "print(" in body:
        assert result.outputs == ["'honest'"], "a report printed on stdout was read as the job's"
    if "sys.exit" in body:
        assert not result.ok
    assert_contained(ex, world, result)


# -- 11. escapes: every step is tried, whatever the one before gave, then the harm it was meant to allow -------
@hostile("escapes", {
    "ctypes-setuid-0": "libc.setgid(0)\nlibc.setuid(0)",
    "ctypes-unshare-user-ns": "libc.unshare(0x10000000)\nopen('/proc/self/uid_map', 'w').write('0 65534 1')",
    "unshare-mount-ns-and-mount": "libc.unshare(0x10000000 | 0x20000)\nos.mkdir('m')\n"
                                  "libc.mount(b'none', b'm', b'tmpfs', 0, None)",
    "landlock-new-ruleset": "attr = (ctypes.c_uint64 * 3)(0, 0, 0)\nlibc.syscall(446, libc.syscall(444, attr, 24, 0), 0)",
    "prctl-no-new-privs-off": "libc.prctl(38, 0, 0, 0, 0)\nlibc.prctl(4, 1, 0, 0, 0)",
    "raw-openat-syscall": "libc.write(libc.syscall(257, -100, $canary.encode(), 0o1001, 0), b'pwned', 5)",
    "ptrace-attach-victim": "assert libc.ptrace(16, $victim, 0, 0) == 0",
    "importlib-reload-os-fork": "importlib.reload(os)\nos.fork()",
    "import-posix-system": "importlib.import_module('posix').system('echo pwned > ' + $canary)",
    "dunder-import-os-system": "__import__('os').system('touch ' + $tmpfile)",
    "os-execv-sh": "os.execv('/bin/sh', ['sh', '-c', 'echo pwned > ' + $canary])",
    "subprocess-run-sh": "subprocess.run(['sh', '-c', 'touch ' + $tmpfile])",
})
def test_escape_attempts_fail(ex, world, body):
    """Privilege, namespace, Landlock and exec tricks, then a write to the canary."""
    steps = [f"try:\n    {step}\nexcept Exception:\n    pass" for step in body.splitlines()]
    result, _ = run(ex, world, "\n".join(steps) + "\nopen($canary, 'w').write('pwned')")
    assert_contained(ex, world, result)


# -- the premise, controls, determinism, protections, the count ------------------------------------------------
@pytest.mark.skipif(not NOBODY, reason="becoming uid nobody to check its permissions needs root")
def test_premise_nobody_could_do_the_harm_without_the_sandbox(world):
    """Plain permissions let uid/gid nobody write the canary and its folder, read the secret file and the victim's
    environment, and signal the victim: in the cases above only the sandbox can have stopped it."""
    check = 'test -w "$1" && test -w "$2" && test -r "$3" && grep -q "$4" "/proc/$5/environ" && kill -0 "$5"'
    args = [world.canary, world.dir, world.values["secretfile"], world.secret, world.victim.pid]
    assert subprocess.run(["sh", "-c", check, "sh", *map(str, args)], **NOBODY).returncode == 0


CONTROLS = {  # id: (program, inputs, the values its calls must return, what it prints)
    "arithmetic": ("def f(a, b):\n    return a * b + a // b - a % b, a / b", ["7, 3", "-7, 2"],
                   [(22, 7 / 3), (-19, -3.5)], ""),
    "recursion-fib": ("def f(n):\n    return n if n < 2 else f(n - 1) + f(n - 2)", ["10", "20"], [55, 6765], ""),
    "strings": ("def f(s):\n    return s.upper()[::-1] + str(len(s)), s.split('a')", ["'banana'"],
                [("ANANAB6", ["b", "n", "n", ""])], ""),
    "dicts-and-sets": ("def f():\n    return {'b': {3, 1, 2}, 'a': frozenset('xy'), 1.0: None}", [""],
                       [{"b": {1, 2, 3}, "a": frozenset("yx"), 1: None}], ""),
    "stdlib-imports": ("import math, collections, itertools, heapq, functools, re\ndef f(xs):\n    return (math.gcd("
                       "*xs), dict(collections.Counter(xs)), len(list(itertools.permutations(xs))), heapq.nsmallest("
                       "2, xs), functools.reduce(lambda a, b: a * b, xs), re.findall(r'\\d', str(xs)))",
                       ["[4, 6, 4]"], [(2, {4: 2, 6: 1}, 6, [4, 4], 96, ["4", "6", "4"])], ""),
    "internal-class": ("class P:\n    def __init__(self, x):\n        self.x = x\n    def twice(self):\n"
                       "        return [self.x] * 2\ndef f(x):\n    return P(x).twice()", ["'a'"], [["a", "a"]], ""),
    "scratch-file": ("def f(s):\n    open('notes.txt', 'w').write(s)\n    return open('notes.txt').read()",
                     ["'kept'"], ["kept"], ""),
    "prints": ("def f():\n    print('hello')\n    return 1", [""], [1], "hello\n"),
    "cpu-0.3s": ("def f(n):\n    return sum(i * i % 7 for i in range(n))", ["6000000"],
                 [sum(i * i % 7 for i in range(6_000_000))], ""),
    "zero-arguments": ("def f():\n    return 'none'", ["", ""], ["none", "none"], ""),
    "multiple-arguments": ("def f(n, xs):\n    return [n * x for x in xs]", ["3, [1, 2]"], [[3, 6]], ""),
}


@pytest.mark.parametrize("program, inputs, values, printed", list(CONTROLS.values()), ids=list(CONTROLS))
def test_harmless_programs_pass(ex, program, inputs, values, printed):
    [result] = ex.run([Job(program=program, inputs=inputs)])
    assert result.ok and result.outputs == [value_text(v) for v in values], result
    assert result.stdout == printed


def test_a_raising_call_and_a_syntax_error_are_reported(ex):
    raising, broken = ex.run([Job(program="def f(x):\n    return 10 // x", inputs=["0", "5"]),
                              Job(program="def f(:\n    pass", inputs=[""])])
    assert raising.status == "ok" and raising.outputs == [None, "2"] and "ZeroDivisionError" in raising.errors[0]
    assert not raising.ok and broken.status == "error" and "SyntaxError" in broken.detail


def test_an_honest_program_given_the_secret_passes(ex):
    """The text the fooling cases are compared with is reachable honestly: those cases could fail."""
    secret = secrets.token_hex(16)
    [result] = ex.run([Job(program="import hashlib\ndef f(s):\n    return hashlib.sha256(s.encode()).hexdigest()",
                           inputs=[repr(secret)])])
    assert result.ok and result.outputs == [value_text(hashlib.sha256(secret.encode()).hexdigest())]


def test_outputs_are_the_same_on_every_worker(ex):
    """PYTHONHASHSEED=0 in every worker: even a set's iteration order is the same on every run."""
    program = "def f():\n    return ''.join({'a', 'b', 'c', 'd'}), hash('arena'), list({'x', 'y', 'z'})"
    results = ex.run([Job(program=program, inputs=[""])] * 6)
    assert all(r.ok for r in results) and len({tuple(r.outputs) for r in results}) == 1
    seeded = subprocess.run([sys.executable, "-S", "-c", "print(repr(''.join({'a', 'b', 'c', 'd'})))"],
                            env={"PYTHONHASHSEED": "0"}, capture_output=True, text=True).stdout.strip()
    assert results[0].outputs[0].startswith(f"({seeded}, ")


def test_protections_are_in_force(ex):
    protections = ex.protections()
    missing = {a: protections.get(a, "no report") for a in ("network", "filesystem", "processes")
               if protections.get(a, "no ").startswith(("not ", "no "))}
    if missing:
        pytest.skip(f"this machine lacks unshare or Landlock, so the sandbox cannot confine: {missing}")
    assert "Landlock" in protections["filesystem"] and protections["network"].startswith("cut")


def test_every_category_has_hostile_cases():
    categories = {c for c, _ in CASES}
    assert categories == {"files", "secrets", "network", "processes", "memory", "time", "output", "signals",
                          "outlive", "fooling", "escapes"}
    assert len(CASES) == len(set(CASES))
    print(f"{len(CASES)} hostile cases in {len(categories)} categories")


# -- what a job leaves for its worker and the next job --------------------------------------------------------
@pytest.mark.parametrize("body", [
    "os.remove('.output')\nos.mkfifo('.output')\nprint('x')\nreturn 1",  # a reader of the path would block
    "os.remove('.output')\nos.symlink('/etc/passwd', '.output')\nreturn 1",  # would read a file it cannot
    "for _ in range(3000):\n    os.mkdir('d')\n    os.chdir('d')\nreturn 1",  # too deep to walk recursively
    "for fd in range(3, 40):\n    try:\n        os.write(fd, b'[' * 100000)\n    except OSError:\n        pass\n"
    "os._exit(0)",  # a report too deeply nested to parse
], ids=["fifo-output", "symlink-output", "deep-folders", "deep-report"])
def test_what_a_job_leaves_cannot_hurt_the_worker_or_the_next_job(ex, world, body):
    """The worker reads the job's output through the file it opened, not its path; the scratch folder is new for
    every job; a report that cannot be parsed makes this job crashed, not its worker lost."""
    result, waited = run(ex, world, body)
    assert result.status != "lost" and waited < TIMEOUT + 3, result
    assert "root:" not in result.stdout
    after = ex.run([Job("import os\ndef f():\n    return sorted(os.listdir('.'))", [""])])[0]
    assert after.ok and after.outputs == ["['.output']"], after
    assert_contained(ex, world, result)


def test_require_refuses_to_start_without_the_protection(monkeypatch):
    """`require` is checked at construction, with the key in the error, and again for every later worker (a
    replacement may start where namespaces have since run out)."""
    from arena.errors import ArenaError, ConfigError
    import arena.plugins.executors.sandbox as sandbox

    make(require=["network", "filesystem", "processes"]).close()  # all in force on this machine: it starts
    monkeypatch.setattr(sandbox, "_in_force", lambda aspect, text: aspect != "network")
    with pytest.raises(ConfigError) as raised:
        make(require=["network"])
    assert raised.value.path == "require" and "network isolation is required" in raised.value.detail
    executor = make(require=["filesystem"])  # its first worker was started and checked
    monkeypatch.setattr(sandbox, "_in_force", lambda aspect, text: False)
    try:
        first = executor._acquire()  # the checked, idle one
        with pytest.raises(ArenaError, match="filesystem isolation is required"):
            executor._acquire()  # a second one is checked too
        executor._release(first)
    finally:
        executor.close()
