#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ProvisionCShims

/// The verdict of `e2fsck -fn` on one partition: forced full check, answering "no" to
/// every repair, so it reads and never writes.
public struct FilesystemCheck: Sendable, Equatable {
    /// e2fsck exit status: 0 means no errors; 4 means errors left uncorrected (-n), 8 an
    /// operational error.
    public var exitStatus: Int32
    /// stdout and stderr of e2fsck, for the job's log when it is not clean.
    public var output: String
    public var clean: Bool { exitStatus == 0 }

    /// e2fsck opens `image?offset=N` through the same unix I/O manager options as
    /// libext2fs, so a partition inside a whole-disk image or device is checked in place.
    ///
    /// Spawned with posix_spawn and waited for on the calling thread. (Foundation's `Process`
    /// starts a run-loop thread with six descriptors on first use and keeps it for the life
    /// of the process: in a daemon that is the one job thing that never came back.)
    static func run(target: String, offset: UInt64, e2fsck: String = "/usr/sbin/e2fsck") throws(AccountsError) -> FilesystemCheck {
        let path = access(e2fsck, X_OK) == 0 ? e2fsck : "/sbin/e2fsck"
        let arguments = [path, "-fn", offset == 0 ? target : "\(target)?offset=\(offset)"]
        var pipeFDs: [Int32] = [-1, -1]
        guard provision_pipe_cloexec(&pipeFDs) == 0 else {
            throw AccountsError(.checker, "cannot run e2fsck: pipe: \(String(cString: strerror(errno)))")
        }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_adddup2(&actions, pipeFDs[1], 1)
        posix_spawn_file_actions_adddup2(&actions, pipeFDs[1], 2)
        var argv: [UnsafeMutablePointer<CChar>?] = arguments.map { strdup($0) } + [nil]
        defer { for a in argv { free(a) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, path, &actions, nil, &argv, environ)
        close(pipeFDs[1])
        guard rc == 0 else {
            close(pipeFDs[0])
            throw AccountsError(.checker, "cannot run e2fsck (\(path)): \(String(cString: strerror(rc))); install e2fsprogs")
        }
        var output: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 16 << 10)
        while true {
            let n = read(pipeFDs[0], &chunk, chunk.count)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            output.append(contentsOf: chunk[0..<n])
        }
        close(pipeFDs[0])
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        // WIFEXITED / WEXITSTATUS; a signal-killed checker is an operational error (8).
        let exit: Int32 = (status & 0x7f) == 0 ? (status >> 8) & 0xff : 8
        return FilesystemCheck(exitStatus: exit, output: String(decoding: output, as: UTF8.self))
    }
}
