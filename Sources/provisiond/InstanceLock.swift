#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// One daemon per ledger and per image cache: an exclusive flock(2) on the ledger file and on
/// the cache directory, held for the daemon's life (the kernel drops it when the process
/// ends, however it ends, so a crash never leaves a stale lock behind).
///
/// The disaster it prevents: a second daemon on the same files empties the first one's cache
/// at start (half-written entries cannot be told from finished ones) and interleaves jobs in
/// one ledger; the first daemon's next jobs then fail reading cache files that are gone.
///
/// flock, not fcntl: SQLite's own locks are fcntl locks, which are per process and dropped
/// when any descriptor of the file closes; a flock is tied to this descriptor only, so the
/// two never meet. The holder's PID is found in /proc/locks (flock keeps none itself).
final class InstanceLock {
    private let fd: Int32

    struct Held: Error, CustomStringConvertible {
        let what: String
        let path: String
        let holder: Int32?
        var description: String {
            let who = holder.map { "another provisiond (pid \($0))" } ?? "another process"
            return "the \(what) \(path) is in use by \(who): one daemon per ledger and cache. "
                + "Stop that daemon first, or give this one its own `ledger` and `cache_dir` in the station config"
        }
    }

    struct Failed: Error, CustomStringConvertible {
        let description: String
    }

    /// Locks `path` (a file, created empty when missing, or a directory), without waiting.
    init(_ what: String, path: String, directory: Bool) throws {
        let parent = (path as NSString).deletingLastPathComponent
        if !parent.isEmpty { try? FileManager.default.createDirectory(atPath: parent, withIntermediateDirectories: true) }
        if directory { try? FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700]) }
        // O_CREAT without O_EXCL: an empty file is what SQLite makes of a new database too.
        let fd = directory ? open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC) : open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0o644)
        guard fd >= 0 else {
            throw Failed(description: "cannot open the \(what) \(path) to lock it: \(String(cString: strerror(errno)))")
        }
        while flock(fd, LOCK_EX | LOCK_NB) != 0 {
            let e = errno
            if e == EINTR { continue }
            let holder = e == EWOULDBLOCK ? Self.holder(of: fd) : nil
            close(fd)
            if e == EWOULDBLOCK { throw Held(what: what, path: path, holder: holder) }
            throw Failed(description: "cannot lock the \(what) \(path): \(String(cString: strerror(e)))")
        }
        self.fd = fd
    }

    deinit { close(fd) }

    /// The PID /proc/locks gives for the flock on the file behind `fd`, if it shows one.
    /// Lines read `1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF` (device major:minor in
    /// hex, then the inode).
    static func holder(of fd: Int32) -> Int32? {
        var st = stat()
        guard fstat(fd, &st) == 0, let text = try? String(contentsOfFile: "/proc/locks", encoding: .utf8) else { return nil }
        let dev = UInt64(st.st_dev)
        let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & ~0xfff)
        let minor = (dev & 0xff) | ((dev >> 12) & ~0xff)
        for line in text.split(separator: "\n") {
            let fields = line.split(separator: " ", omittingEmptySubsequences: true)
            // A blocked waiter's line starts with "1: ->"; only the holder's counts.
            guard fields.count >= 6, fields[1] == "FLOCK", fields[2] != "->" else { continue }
            let id = fields[5].split(separator: ":")
            guard id.count == 3, UInt64(id[0], radix: 16) == major, UInt64(id[1], radix: 16) == minor,
                  UInt64(id[2]) == UInt64(st.st_ino), let pid = Int32(fields[4]), pid > 0 else { continue }
            return pid
        }
        return nil
    }
}
