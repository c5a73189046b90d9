#if canImport(Glibc)
import Glibc
#endif
import Foundation
import ProvisionCShims
import SystemPackage

/// The device (or file) an image is written to, opened for direct I/O.
///
/// Block devices are opened `O_DIRECT | O_EXCL`: direct so that what we read back comes from
/// the card and not the page cache, exclusive so the kernel itself refuses a device that is
/// mounted or held by another writer. Regular files work too (image to image), with direct
/// I/O where the filesystem supports it.
public final class WriteTarget: @unchecked Sendable {
    public enum Kind: Sendable { case blockDevice, regularFile }

    public let path: String
    public let kind: Kind
    public let fd: Int32
    /// Device size in bytes; nil for regular files (they grow).
    public let size: UInt64?
    public let logicalBlockSize: Int
    /// Device number of the block device (st_rdev) and its disk sequence number: together
    /// they name one piece of media, so a different card on a reused node is noticed.
    public let deviceNumber: UInt64?
    public let diskSequence: UInt64?
    public let direct: Bool
    /// Buffer alignment for O_DIRECT: max(logical block size, 4096).
    public var alignment: Int { max(logicalBlockSize, 4096) }

    /// Opens `path` first and decides everything on the descriptor (`fstat`, the block
    /// ioctls), never on the path: a path that changes between a check and the open — a file
    /// swapped for a symlink to a partition — cannot redirect the write (issue 13). The last
    /// component is not followed when it is a symlink unless `followSymlinks` is set: a link
    /// planted where a file target is expected must not overwrite what it points at.
    ///
    /// - Parameter busyGrace: how long a busy device is retried. A card that just appeared
    ///   is often held for a moment by udev's probes or by the tool that set it up; a device
    ///   that is mounted or held stays busy and is refused after this.
    /// `createFile`: a path that names nothing becomes a new file (`provision write` to a file
    /// the user named). The station passes false: its targets are device nodes, and a node
    /// that vanished (a reader pulled) must not become a regular file in /dev, which would
    /// then take the node's place when the reader comes back.
    public static func open(path: String, followSymlinks: Bool = false, createFile: Bool = true, busyGrace: Duration = .seconds(3)) throws(ImageIOError) -> WriteTarget {
        let noFollow = followSymlinks ? 0 : O_NOFOLLOW
        // O_EXCL without O_CREAT claims a block device exclusively and means nothing for a
        // regular file (Linux), so one set of flags serves both until fstat says which it is.
        let flags = O_RDWR | Syscall.oDirect | Syscall.oExclusive | noFollow
        var direct = true
        var opened = Syscall.open(path, flags: flags)
        let deadline = ContinuousClock.now + busyGrace
        while case .failure(.resourceBusy) = opened, ContinuousClock.now < deadline {
            usleep(100_000)
            opened = Syscall.open(path, flags: flags)
        }
        if case .failure(.invalidArgument) = opened {
            // A filesystem that refuses O_DIRECT (tmpfs before 6.6): only a file can be here.
            direct = false
            opened = Syscall.open(path, flags: flags & ~Syscall.oDirect)
        }
        if case .failure(.noSuchFileOrDirectory) = opened, createFile {
            // A new file: O_CREAT|O_EXCL never follows a symlink and fails if anything is there.
            opened = Syscall.open(path, flags: O_RDWR | O_CREAT | O_EXCL | Syscall.oDirect, mode: 0o644)
            if case .failure(.invalidArgument) = opened {
                direct = false
                opened = Syscall.open(path, flags: O_RDWR | O_CREAT | O_EXCL, mode: 0o644)
            }
        }
        let fd: Int32
        switch opened {
        case .success(let f): fd = f
        case .failure(.tooManySymbolicLinkLevels) where !followSymlinks:
            let pointsTo = (try? FileManager.default.destinationOfSymbolicLink(atPath: path)).map { " (to \($0))" } ?? ""
            throw ImageIOError(.invalidArgument, "\(path) is a symbolic link\(pointsTo): name the device or file itself, or pass --follow-symlinks")
        case .failure(.noSuchFileOrDirectory) where !createFile:
            throw ImageIOError(.deviceRemoved, "\(path) is gone: the card or its reader was removed before it was opened; nothing was written", errno: .noSuchFileOrDirectory)
        case .failure(.resourceBusy):
            throw ImageIOError(.deviceBusy, "\(path) is busy: it is mounted, part of a RAID/LVM/dm device, or open in another program", errno: .resourceBusy)
        case .failure(let e) where e == .readOnlyFileSystem || (e == .permissionDenied && isReadOnly(path: path)):
            throw ImageIOError(.deviceReadOnly, "\(path) is write-protected: slide the card's lock switch to unlock it, then reinsert it")
        case .failure(let e):
            throw ImageIOError.device(e, operation: "open", path: path, offset: nil)
        }
        var st = stat()
        guard fstat(fd, &st) == 0 else {
            let e = Errno(rawValue: errno)
            Syscall.close(fd)
            throw ImageIOError.device(e, operation: "fstat", path: path, offset: nil)
        }
        switch st.st_mode & S_IFMT {
        case S_IFBLK:
            guard direct else {
                Syscall.close(fd)
                throw ImageIOError(.invalidArgument, "\(path) is a block device that refuses direct I/O")
            }
            var bytes: UInt64 = 0
            var lbs: Int32 = 512
            var ro: Int32 = 0
            var seq: UInt64 = 0
            guard provision_blk_getsize64(fd, &bytes) == 0, provision_blk_logical_block_size(fd, &lbs) == 0 else {
                let e = Errno(rawValue: errno)
                Syscall.close(fd)
                throw ImageIOError.device(e, operation: "reading its size", path: path, offset: nil)
            }
            _ = provision_blk_readonly(fd, &ro)
            if ro != 0 {
                Syscall.close(fd)
                throw ImageIOError(.deviceReadOnly, "\(path) is write-protected: slide the card's lock switch to unlock it, then reinsert it")
            }
            let hasSeq = provision_blk_diskseq(fd, &seq) == 0
            return WriteTarget(path: path, kind: .blockDevice, fd: fd, size: bytes, logicalBlockSize: Int(lbs),
                               deviceNumber: UInt64(st.st_rdev), diskSequence: hasSeq ? seq : nil, direct: true)
        case S_IFREG:
            return WriteTarget(path: path, kind: .regularFile, fd: fd, size: nil, logicalBlockSize: 512,
                               deviceNumber: nil, diskSequence: nil, direct: direct)
        default:
            Syscall.close(fd)
            throw ImageIOError(.invalidArgument, "\(path) is neither a block device nor a regular file")
        }
    }

    /// The disk sequence the kernel reports for the open device now (nil for files, or a
    /// kernel without BLKGETDISKSEQ): another card in the same reader slot has another one.
    public var currentDiskSequence: UInt64? {
        guard kind == .blockDevice else { return nil }
        var seq: UInt64 = 0
        return closeLock.withLock { closed ? nil : (provision_blk_diskseq(fd, &seq) == 0 ? seq : nil) }
    }

    private init(path: String, kind: Kind, fd: Int32, size: UInt64?, logicalBlockSize: Int, deviceNumber: UInt64?, diskSequence: UInt64?, direct: Bool) {
        self.path = path
        self.kind = kind
        self.fd = fd
        self.size = size
        self.logicalBlockSize = logicalBlockSize
        self.deviceNumber = deviceNumber
        self.diskSequence = diskSequence
        self.direct = direct
    }

    private let closeLock = NSLock()
    private var closed = false

    deinit { close() }

    /// Closes the device now (another program — the injector — may need it exclusively).
    public func close() {
        closeLock.withLock {
            if !closed { Syscall.close(fd); closed = true }
        }
    }

    private static func isReadOnly(path: String) -> Bool {
        let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { Glibc.close(fd) }
        var ro: Int32 = 0
        return provision_blk_readonly(fd, &ro) == 0 && ro != 0
    }

    /// True when the node still names the media we opened. A failing write on a node that
    /// is gone, or now has another disk sequence, means the card was pulled.
    func stillPresent() -> Bool {
        guard kind == .blockDevice else { return true }
        let probe = Glibc.open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK)
        guard probe >= 0 else { return false }
        defer { Glibc.close(probe) }
        var bytes: UInt64 = 0
        // A pulled card leaves a node of size 0 (or a different size: other media).
        guard provision_blk_getsize64(probe, &bytes) == 0, bytes > 0, bytes == size else { return false }
        var seq: UInt64 = 0
        if let diskSequence, provision_blk_diskseq(probe, &seq) == 0, seq != diskSequence { return false }
        return true
    }

    /// Classifies a failed device operation: a vanished card is "removed", not "I/O error".
    func failure(_ e: Errno, operation: String, offset: UInt64?) -> ImageIOError {
        if kind == .blockDevice, e == .ioError || e == .noSuchAddressOrDevice || e == .noSpace, !stillPresent() {
            return .device(.noSuchAddressOrDevice, operation: operation, path: path, offset: offset)
        }
        return .device(e, operation: operation, path: path, offset: offset)
    }
}
