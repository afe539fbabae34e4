"""The sandbox's worker: a standalone script (standard library only) that runs untrusted Python programs.

arena starts it as `python -S -s -B -P sandbox_worker.py LIMITS_JSON` with an empty environment. It confines
itself once (namespaces), forks a server that stays up, and the server forks one short-lived child per job:

  launcher ── unshare(user?, net, pid) ──> server (pid 1 of a new pid namespace) ──fork──> job child

The job child gets, before any untrusted line runs: its own session and process group, a kill-on-parent-death
signal, /dev/null as stdin and a size-limited file in the scratch folder as stdout and stderr, every other file
descriptor closed but its result pipe, rlimits (CPU seconds, address space, file size, open files, processes,
no core files), the uid `nobody` when the worker runs as root, and a Landlock domain: read-only access to the
Python standard library and the shared libraries, read-write access to the scratch folder only, no TCP, no
signals or abstract sockets outside its own domain. It then runs the program and writes a JSON report of plain
text values to the result pipe. The server enforces the wall-clock limit, kills every process the job left
(pid 1 of a namespace can kill all of it), and answers arena with the report.

Requests and answers on stdin/stdout: a 4-byte big-endian length, then that many bytes of JSON.

Nothing here decides whether a program is right: the child reports the values its calls returned, as canonical
text (`value_text`, from arena/values.py), and arena compares them in its own process. A program can make its calls report whatever it
likes, which is the same as returning it; it never sees the expected answers.
"""

from __future__ import annotations

import array
import ctypes
import errno
import fcntl
import importlib.util
import json
import math
import os
import select
import signal
import struct
import sys
import sysconfig
import termios
import time

# arena's canonical value text (arena/values.py), bound by main() before any job runs
value_text = parse_arguments = None


def load_values(path: str) -> None:
    """Bind `value_text` and `parse_arguments` from arena's values module, loaded by file path: this script runs
    without site-packages, so it cannot import the arena package (the module needs only the standard library)."""
    global value_text, parse_arguments
    spec = importlib.util.spec_from_file_location("arena_values", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    value_text, parse_arguments = module.value_text, module.parse_arguments


# -- Linux confinement through libc ---------------------------------------------------------------------------

CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWPID, CLONE_NEWNS = 0x10000000, 0x40000000, 0x20000000, 0x00020000
MS_NOSUID, MS_NODEV, MS_REC, MS_PRIVATE = 2, 4, 1 << 14, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1, 2, 4, 8
FS_TRUNCATE, FS_IOCTL_DEV = 1 << 14, 1 << 15
FS_RIGHTS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1, 5: (1 << 16) - 1}
FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV
NET_BIND_TCP, NET_CONNECT_TCP = 1, 2
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1, 2
NOBODY = 65534

_libc = None


def libc():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def unshare_namespaces() -> dict[str, str]:
    """Cut the network and hide other processes: new network and pid namespaces (and a user namespace first when
    not root, which is what lets an unprivileged user create them). Returns what it achieved, for the report."""
    if not sys.platform.startswith("linux"):
        return {"network": "not cut: no network namespaces on this platform",
                "processes": "no pid namespace on this platform"}
    uid, gid = os.getuid(), os.getgid()
    base = 0 if uid == 0 else CLONE_NEWUSER
    for flags in (base | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWNS, base | CLONE_NEWNET | CLONE_NEWPID,
                  base | CLONE_NEWNET):
        if libc().unshare(flags) == 0:
            break
    else:
        err = ctypes.get_errno()
        return {"network": f"not cut: unshare failed ({os.strerror(err)})",
                "processes": f"no pid namespace: unshare failed ({os.strerror(err)})"}
    if base:
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    return {"network": "cut: a network namespace with no interfaces up",
            "processes": ("a pid namespace (the job sees no process outside it)" if flags & CLONE_NEWPID else
                          "no pid namespace: unshare refused it"),
            "mounts": "private" if flags & CLONE_NEWNS else "shared with the host"}


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


# What Landlock leaves open, refused with EPERM by a seccomp filter: extended attributes, file times, modes and
# ownership (Landlock does not guard metadata, so a job could mark a world-writable file elsewhere, or, running
# as the user, chmod the user's files), Unix-domain sockets (a socket file outside the scratch folder, such as a
# desktop or system bus, is reachable through connect(), which Landlock does not check), and io_uring (which
# would bypass the filter). Per architecture: (audit arch, syscall numbers to refuse, truncate's number (refused
# where Landlock is older than ABI 3, which guards it), the socket and socketpair numbers).
SECCOMP_ARCH = {
    "x86_64": (0xC000003E, (188, 189, 190, 197, 198, 199, 463, 466,  # xattrs, *xattrat
                            132, 235, 261, 280,  # utime, utimes, futimesat, utimensat
                            90, 91, 92, 93, 94, 260, 268, 452,  # chmod, fchmod, chown, fchown, lchown, fchownat,
                            425, 426, 427),  # fchmodat, fchmodat2; io_uring
               76, (41, 53)),
    "aarch64": (0xC00000B7, (5, 6, 7, 14, 15, 16, 463, 466, 88, 52, 53, 54, 55, 452, 425, 426, 427), 45, (198, 199)),
}
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000
AF_UNIX = 1


def seccomp_filter(landlock: int) -> _SockFprog | None:
    """The BPF program of the filter above for this machine's architecture, or None where it is not known."""
    import platform

    arch = SECCOMP_ARCH.get(platform.machine())
    if arch is None or not sys.platform.startswith("linux"):
        return None
    audit_arch, refused, truncate, sockets = arch
    refused = refused + ((truncate,) if landlock < 3 else ())
    ld_w_abs, jeq_k, jge_k, ret_k = 0x20, 0x15, 0x35, 0x06
    deny = SECCOMP_RET_ERRNO | errno.EPERM
    # a call from another ABI (32-bit, whose numbers differ) is refused outright
    body = [(ld_w_abs, 0, 0, 4), (jeq_k, 1, 0, audit_arch), (ret_k, 0, 0, deny), (ld_w_abs, 0, 0, 0)]
    tail = [(ret_k, 0, 0, SECCOMP_RET_ALLOW), (ret_k, 0, 0, deny)]
    # each refused number (and x32's, flagged by bit 30) jumps to the final "deny"; the socket calls go on to
    # check their family argument
    checks = [(jge_k, 0, 0, 0x40000000)] + [(jeq_k, 0, 0, nr) for nr in refused]
    family = [(jeq_k, 0, 0, nr) for nr in sockets]
    program = body + checks + family + [(ret_k, 0, 0, SECCOMP_RET_ALLOW), (ld_w_abs, 0, 0, 16),
                                        (jeq_k, 0, 0, AF_UNIX)] + tail
    deny_at, allow_at = len(program) - 1, len(program) - 2
    family_start = len(body) + len(checks)
    family_check = family_start + len(family) + 1  # the `ld args[0]`
    fixed = []
    for i, (code, jt, jf, k) in enumerate(program):
        if len(body) <= i < family_start:
            jt = deny_at - i - 1
        elif family_start <= i < family_start + len(family):
            jt = family_check - i - 1
        elif i == family_check + 1:
            jt, jf = deny_at - i - 1, allow_at - i - 1
        fixed.append((code, jt, jf, k))
    filters = (_SockFilter * len(fixed))(*[_SockFilter(*f) for f in fixed])
    return _SockFprog(len(fixed), filters)


def landlock_abi() -> int:
    if not sys.platform.startswith("linux"):
        return 0
    abi = libc().syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return max(abi, 0)


def read_only_paths() -> list[str]:
    """What a job may read: the standard library (and its compiled modules), the shared libraries they load,
    and a few harmless devices. Not the home folder, /proc, /etc or arena's files."""
    paths = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib")}
    paths |= {"/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/local/lib", "/dev/null", "/dev/urandom",
              "/dev/zero"}
    return sorted(p for p in paths if os.path.exists(p))


def landlock_report(abi: int) -> str:
    if abi < 1:
        return "not confined: this kernel has no Landlock (Linux 5.13+ with landlock in its LSM list)"
    extras = [x for x, ok in (("TCP", abi >= 4), ("signals and abstract sockets", abi >= 6)) if ok]
    return f"confined by Landlock ABI {abi}: writes only in the scratch folder" + (
        f"; also blocks {' and '.join(extras)}" if extras else "")


def landlock_ruleset(scratch: str, abi: int) -> int:
    """A Landlock ruleset (its fd) that the job child enforces on itself: read beneath `read_only_paths`, read
    and write beneath `scratch`, nothing else; no TCP (ABI 4+); no signals or abstract Unix sockets out of the
    job's own domain (ABI 6+)."""
    fs_rights = FS_RIGHTS_BY_ABI.get(abi, FS_RIGHTS_BY_ABI[5])
    attr = _RulesetAttr(fs_rights, NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0,
                        SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0)
    size = ctypes.sizeof(_RulesetAttr) if abi >= 6 else (16 if abi >= 4 else 8)
    fd = _check(libc().syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size),
                               ctypes.c_uint32(0)), "landlock_create_ruleset")
    read = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
    for path, rights in [*((p, read) for p in read_only_paths()), (scratch, fs_rights), ("/dev/null", read | FS_WRITE_FILE)]:
        if not os.path.isdir(path):
            rights &= FILE_RIGHTS
        rights &= fs_rights
        pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        try:
            rule = _PathBeneath(rights, pfd)
            _check(libc().syscall(SYS_LANDLOCK_ADD_RULE, fd, 1, ctypes.byref(rule), ctypes.c_uint32(0)),
                   f"landlock_add_rule {path}")
        finally:
            os.close(pfd)
    return fd


# -- one job --------------------------------------------------------------------------------------------------

def run_job(request: dict, result_fd: int) -> None:
    """In the job child, after confinement: run the program, report the values of its calls, exit."""
    report: dict = {"load_error": None, "outputs": [], "errors": []}
    namespace: dict = {"__name__": "__sandbox__"}
    # every job is forked from the same worker memory: a random shift of the allocator makes a value that
    # depends on addresses (id(), the default hash) differ between two runs, as it would between two processes
    padding = [object() for _ in range(int.from_bytes(os.urandom(2), "little"))]  # noqa: F841
    try:
        exec(compile(request["program"], "<program>", "exec"), namespace)
        entry = namespace[request["entry"]]
        if not callable(entry):
            raise TypeError(f"{request['entry']} is not a function")
    except BaseException as exc:  # noqa: BLE001 - SystemExit and KeyboardInterrupt are the program's too
        report["load_error"] = _describe(exc)
        entry = None
    if entry is not None:
        for text in request["inputs"]:
            try:
                value = value_text(entry(*parse_arguments(text)))
                error = None if len(value) <= request["max_value_chars"] else "the value's text is too long"
            except BaseException as exc:  # noqa: BLE001
                value, error = None, _describe(exc)
            report["outputs"].append(None if error else value)
            report["errors"].append(error)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001 - the program may have replaced or closed it
            pass
    data = json.dumps(report).encode()
    view = memoryview(data)
    while view:
        view = view[os.write(result_fd, view):]
    os._exit(0)


def _describe(exc: BaseException) -> str:
    try:
        return f"{type(exc).__name__}: {exc}"[:300]
    except BaseException:  # noqa: BLE001 - a str() that raises
        return type(exc).__name__


def confine_child(limits: dict, scratch: str, ruleset_fd: int, result_fd: int, output_fd: int,
                  seccomp: object) -> None:
    """Everything a job gets before its first line runs (see the module docstring)."""
    linux = sys.platform.startswith("linux")
    os.setsid()
    devnull = os.open("/dev/null", os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(output_fd, 1)
    os.dup2(output_fd, 2)
    keep = sorted({result_fd, ruleset_fd} - {-1})
    for low, high in zip([3, *(k + 1 for k in keep)], [*keep, 1 << 16]):
        os.closerange(low, high)
    os.chdir(scratch)
    import resource

    cpu = int(math.ceil(limits["timeout"])) + 1  # past the soft limit SIGXCPU ends the job: a timeout
    for name, soft, hard in (("RLIMIT_CORE", 0, 0), ("RLIMIT_CPU", cpu, cpu + 1),
                             ("RLIMIT_AS", limits["memory_mb"] << 20, limits["memory_mb"] << 20),
                             ("RLIMIT_FSIZE", limits["file_size_mb"] << 20, limits["file_size_mb"] << 20),
                             ("RLIMIT_NOFILE", limits["open_files"], limits["open_files"]),
                             ("RLIMIT_NPROC", 1, 1)):
        if hasattr(resource, name):
            resource.setrlimit(getattr(resource, name), (soft, hard))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the file-size limit fails; it does not kill
    if os.getuid() == 0:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    if linux:  # after the uid change, which clears it: the job dies with its worker
        libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if ruleset_fd >= 0 or seccomp is not None:
            _check(libc().prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
        if ruleset_fd >= 0:
            _check(libc().syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset_fd, ctypes.c_uint32(0)),
                   "landlock_restrict_self")
            os.close(ruleset_fd)
        if seccomp is not None:
            _check(libc().prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(seccomp), 0, 0), "seccomp")
    os.environ.clear()
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = sys.stdout


# -- the server -----------------------------------------------------------------------------------------------
#
# The server never holds a job's report or printed output in its own memory: both go from the job's pipe and
# output file to arena through the kernel (splice, sendfile). Every job is forked from the server's memory, so
# anything the server had read (a validation run's values, the gold answers of a task) could be dug out of it
# by a later job; this way nothing of one job's results is there for the next.

def read_message(fd: int) -> dict | None:
    head = read_exactly(fd, 4)
    if head is None:
        return None
    return json.loads(read_exactly(fd, struct.unpack(">I", head)[0]) or b"null")


def read_exactly(fd: int, n: int, deadline: float | None = None) -> bytes | None:
    """n bytes from fd, or None at end of file or once the `time.monotonic()` deadline passes (if one is given)."""
    chunks, got = [], 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
        chunk = os.read(fd, n - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def write_message(fd: int, message: dict) -> None:
    _write_all(fd, json.dumps(message).encode(), framed=True)


def _write_all(fd: int, data: bytes, framed: bool = False) -> None:
    view = memoryview(struct.pack(">I", len(data)) + data if framed else data)
    while view:
        view = view[os.write(fd, view):]


def _relay(out_fd: int, src: int, count: int, offset: int | None) -> None:
    """Copy `count` bytes of a pipe (offset None) or file to arena without reading them into this process."""
    sent = 0
    while sent < count:
        if offset is None and hasattr(os, "splice"):
            moved = os.splice(src, out_fd, count - sent)
        elif offset is not None and hasattr(os, "sendfile"):
            moved = os.sendfile(out_fd, src, offset + sent, count - sent)
        else:  # no zero-copy call here: fall back to reading
            chunk = os.pread(src, count - sent, offset + sent) if offset is not None else os.read(src, count - sent)
            _write_all(out_fd, chunk)
            moved = len(chunk)
        if moved <= 0:
            raise OSError("the job's data ended early")
        sent += moved


# Modules a job can import even where the standard library is not readable by `nobody` (a Python installed under
# /root): imported here once, so every forked job has them already. The dangerous ones are here on purpose: the
# confinement, not a missing module, is what must stop a program that uses them.
PRELOADED = ("abc", "bisect", "collections", "copy", "dataclasses", "datetime", "decimal", "enum", "fractions",
             "functools", "hashlib", "heapq", "itertools", "json", "math", "operator", "random", "re", "statistics",
             "string", "typing", "unicodedata", "encodings.idna", "importlib", "socket", "subprocess", "threading",
             "multiprocessing", "shutil", "pathlib", "tempfile", "urllib.request", "inspect", "gc")
MNT_DETACH = 2
PIPE_BYTES = 1 << 20  # a job's report must fit in its pipe: the server reads it only once the job has ended


class Scratch:
    """The job's writable folder. With private mounts, a tmpfs mounted afresh for every job (nothing a job
    leaves can trouble the next); otherwise a folder on disk, emptied after each job."""

    def __init__(self, path: str, size_mb: int, private_mounts: bool):
        self.path, self.size_mb, self.tmpfs = path, size_mb, private_mounts
        if private_mounts and libc().mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
            self.tmpfs = False
        if self.tmpfs and not self._mount():
            self.tmpfs = False
            self.report = f"a folder on disk: mounting a tmpfs failed ({os.strerror(ctypes.get_errno())})"
        elif self.tmpfs:
            self.report = f"a private {size_mb} MiB tmpfs, mounted afresh for each job"
        else:
            self.report = f"a folder on disk ({path}), emptied after each job; each file limited, not their total"
        self._own()

    def _mount(self) -> bool:
        data = f"size={self.size_mb}m,nr_inodes=4096,mode=0700".encode()
        return libc().mount(b"tmpfs", self.path.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, data) == 0

    def _own(self) -> None:
        if os.getuid() == 0:  # the job runs as nobody
            os.chown(self.path, NOBODY, NOBODY)

    def reset(self) -> bool:
        """Make the folder empty for the next job; False when what the last job left could not be removed."""
        try:
            if self.tmpfs:
                if libc().umount2(self.path.encode(), MNT_DETACH) != 0 or not self._mount():
                    return False
            else:
                clear_folder(self.path)
            self._own()
            return True
        except Exception:  # noqa: BLE001 - e.g. a folder tree too deep to walk
            return False


def clear_folder(path: str) -> None:
    """Empty a folder on disk, whatever a job left in it (folders it made unreadable included); symlinks are
    removed, never followed."""
    os.chmod(path, 0o700)
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            clear_folder(entry.path)
            os.rmdir(entry.path)
        else:
            os.unlink(entry.path)


def serve(limits: dict, protections: dict, in_fd: int, out_fd: int) -> None:
    for name in PRELOADED:
        try:
            __import__(name)
        except ImportError:
            pass
    private = protections.pop("mounts", "") == "private"
    if private and os.getpid() == 1 and libc().mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV, None) == 0:
        protections["processes"] += "; /proc shows only the namespace"
    scratch = Scratch(limits["scratch"], limits["scratch_mb"], private)
    protections["scratch"] = scratch.report
    abi = landlock_abi()
    try:  # built again for every job; a failure here would fail each of them, so it is reported once instead
        if abi > 0:
            os.close(landlock_ruleset(scratch.path, abi))
        protections["filesystem"] = landlock_report(abi)
    except OSError as exc:
        abi, protections["filesystem"] = 0, f"not confined: {exc}"
    seccomp = seccomp_filter(abi)
    protections["syscalls"] = ("a seccomp filter refuses extended attributes, file times and modes, ownership, "
                               "Unix sockets and io_uring" if seccomp is not None else
                               "no seccomp filter for this architecture")
    protections["user"] = "nobody (uid 65534)" if os.getuid() == 0 else f"uid {os.getuid()} (not root)"
    protections["limits"] = (f"{limits['timeout']} s wall clock, {limits['memory_mb']} MiB memory, "
                             f"{limits['file_size_mb']} MiB files, {limits['open_files']} open files, no new "
                             "processes or threads")
    pid1 = os.getpid() == 1
    write_message(out_fd, {"ready": True, "protections": protections})
    while True:
        request = read_message(in_fd)
        if request is None:
            return
        header, report_fd, output_fd = run_one(request, limits, scratch, abi, seccomp, pid1)
        try:
            write_message(out_fd, header)
            _relay(out_fd, report_fd, header["report_bytes"], None)
            _relay(out_fd, output_fd, header["stdout_bytes"], 0)
        finally:
            os.close(report_fd)
            os.close(output_fd)


def run_one(request: dict, limits: dict, scratch: Scratch, abi: int, seccomp: object,
            pid1: bool) -> tuple[dict, int, int]:
    """Run one job; returns the answer's header and the fds of its report and its printed output."""
    ruleset_fd = landlock_ruleset(scratch.path, abi) if abi > 0 else -1  # per job: a new tmpfs, a new folder
    read_end, write_end = os.pipe()
    if hasattr(fcntl, "F_SETPIPE_SZ"):
        try:
            fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        except OSError:
            pass
    output_fd = os.open(os.path.join(scratch.path, ".output"), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            confine_child(limits, scratch.path, ruleset_fd, write_end, output_fd, seccomp)
            run_job(request, write_end)
        finally:
            os._exit(70)
    os.close(write_end)
    if ruleset_fd >= 0:
        os.close(ruleset_fd)
    timed_out = not _wait_exit(pid, start + limits["timeout"])
    if timed_out:
        _kill_group(pid)
    _, status = os.waitpid(pid, 0)
    seconds = time.monotonic() - start
    _kill_group(pid)
    if pid1:  # pid 1 of its own namespace: whatever the job left behind (a double fork, a setsid) dies here
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            pass
    while True:  # reap everything: our child and, as pid 1, any orphan
        try:
            if os.waitpid(-1, os.WNOHANG if not pid1 else 0)[0] == 0:
                break
        except ChildProcessError:
            break
    report_bytes = _pipe_bytes(read_end)
    header = {"seconds": seconds, "status": "exited", "detail": None, "report_bytes": report_bytes,
              "stdout_bytes": min(os.fstat(output_fd).st_size, limits["max_stdout_bytes"])}
    if timed_out:
        header.update(status="timeout", detail=f"still running after {limits['timeout']} s; killed")
    elif os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        header.update(status="timeout" if sig == signal.SIGXCPU else "crashed",
                      detail=f"killed by {name}" + (" (CPU time limit)" if sig == signal.SIGXCPU else ""))
    elif not scratch.reset():
        header.update(status="crashed", detail="it left a scratch folder that could not be emptied")
    if header["status"] != "exited":
        scratch.reset()
        header["report_bytes"] = 0
    return header, read_end, output_fd


def _pipe_bytes(fd: int) -> int:
    """How many bytes wait in a pipe, without reading them (FIONREAD)."""
    size = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, size, True)
    return size[0]


def _wait_exit(pid: int, deadline: float) -> bool:
    """Wait until the job exits or the deadline passes (False). Its pipe plays no part: a job that closes its
    report pipe and goes on running still meets the deadline."""
    if hasattr(os, "pidfd_open"):
        pidfd = os.pidfd_open(pid)
        try:
            return bool(select.select([pidfd], [], [], max(deadline - time.monotonic(), 0))[0])
        finally:
            os.close(pidfd)
    while time.monotonic() < deadline:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        time.sleep(0.002)
    return False


def _kill_group(pid: int) -> None:
    for target in (-pid, pid):
        try:
            os.kill(target, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def main() -> None:
    limits = json.loads(sys.argv[1])
    load_values(limits["values"])
    in_fd, out_fd = os.dup(0), os.dup(1)  # the protocol; 0 and 1 themselves go to /dev/null
    devnull = os.open("/dev/null", os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    protections = {"process": "a separate process per job, forked from a clean interpreter with no environment"}
    protections.update(unshare_namespaces())
    if os.path.exists("/proc/self") and sys.platform.startswith("linux"):
        pid = os.fork()  # after unshare(CLONE_NEWPID) the first child is pid 1 of the new namespace
        if pid:
            signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGKILL))
            while True:
                try:
                    _, status = os.waitpid(pid, 0)
                    break
                except InterruptedError:
                    continue
            os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
        libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    serve(limits, protections, in_fd, out_fd)


if __name__ == "__main__":
    main()
