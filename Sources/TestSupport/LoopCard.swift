// An "SD card" for tests: a sparse file attached to a loop device.
//
// The backing file is named provision-card-<label>-<random>.img, which is what
// udev-rules/99-provision-test-loop.rules looks for: with that rule loaded the card is
// tagged `provision` and its slot path is "loop:<backing file>".
//
// Lifetime: call `close()` when done (detach, drop the throttle, delete the file). deinit
// does the same as a safety net, but a test should not rely on when deinit runs. Every
// operation that touches /dev/loopN first checks that loopN is still attached to this
// card's file: loop devices are reused, and a card detached lazily may already be another
// session's device.

#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Synchronization

public struct LoopCardError: Error, CustomStringConvertible, Sendable {
    public let description: String
}

public final class LoopCard: Sendable {
    public struct Options: Sendable {
        /// `losetup --direct-io=on`: the loop driver writes the file with O_DIRECT, so the
        /// card's speed is the disk's, not the page cache's, and throttling means something.
        public var directIO = true
        /// `losetup --partscan`, then `partx --update`: partitions appear as loopNpM.
        /// (This machine's kernel has no partition table parsers at all, so the kernel's own
        /// scan finds nothing; partx adds the partitions with BLKPG, which works anyway.)
        public var partitionScan = false
        /// `losetup --read-only`: the card's lock switch.
        public var readOnly = false

        public init(directIO: Bool = true, partitionScan: Bool = false, readOnly: Bool = false) {
            self.directIO = directIO
            self.partitionScan = partitionScan
            self.readOnly = readOnly
        }
    }

    /// The label given at creation, as it appears in the file name.
    public let label: String
    /// Absolute path of the backing file.
    public let backingFile: String
    /// The loop device, e.g. /dev/loop3.
    public let devicePath: String
    /// Kernel name, e.g. loop3.
    public let name: String
    public let major: UInt32
    public let minor: UInt32
    /// What a station config's slot `match` sees: "loop:" + backing file.
    public var slotPath: String { "loop:" + backingFile }

    private let directory: String
    private let ownsDirectory: Bool
    /// False for a card attached to a file someone else made (`existingFile`, FakeCard's
    /// FUSE file): `close()` leaves that file alone.
    private let ownsFile: Bool
    private let state = Mutex(State())

    private struct State {
        var throttled = false
        var closed = false
    }

    /// Creates a zero-filled sparse card of `size` bytes and attaches it.
    ///
    /// - Parameters:
    ///   - label: goes into the file name (characters other than letters, digits, `.`, `_`
    ///     and `-` become `_`); use it to tell cards apart in slot globs.
    ///   - image: when given, the card starts as a sparse copy of this file (grown to `size`
    ///     when `size` is larger).
    ///   - directory: where the backing file goes; a fresh /tmp/provision-cards-XXXXXX
    ///     (deleted by `close()`) when nil.
    ///   - existingFile: attach this file as it is instead of making one (its name must
    ///     contain `provision-card` for the udev rule; `size`, `image` and `directory` are
    ///     ignored, and `close()` does not delete it).
    public init(
        label: String, size: Int64, image: String? = nil, options: Options = Options(),
        directory: String? = nil, existingFile: String? = nil
    ) throws {
        let safe = String(label.map { $0.isLetter || $0.isNumber || "._-".contains($0) ? $0 : "_" })
        self.label = safe
        ownsFile = existingFile == nil
        if let existingFile {
            self.directory = URL(fileURLWithPath: existingFile).deletingLastPathComponent().path
            ownsDirectory = false
        } else if let directory {
            self.directory = directory
            ownsDirectory = false
        } else {
            var template = Array("/tmp/provision-cards-XXXXXX".utf8CString)
            guard let made = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else {
                throw LoopCardError(description: "cannot create a temporary directory in /tmp: \(String(cString: strerror(errno)))")
            }
            self.directory = String(cString: made)
            ownsDirectory = true
        }
        let random = String(UInt64.random(in: 0...UInt64.max), radix: 36)
        backingFile = existingFile ?? "\(self.directory)/provision-card-\(safe)-\(random).img"

        var attached: String?
        do {
            if existingFile == nil {
                if let image {
                    try Command.check(["cp", "--sparse=always", image, backingFile])
                }
                let fd = open(backingFile, O_WRONLY | O_CREAT | O_CLOEXEC, 0o644)
                guard fd >= 0 else {
                    throw LoopCardError(description: "cannot create \(backingFile): \(String(cString: strerror(errno)))")
                }
                var info = stat()
                fstat(fd, &info)
                let grown = Int64(info.st_size) < size ? ftruncate(fd, off_t(size)) : 0
                let truncateErrno = errno
                Glibc.close(fd)
                guard grown == 0 else {
                    throw LoopCardError(description: "cannot grow \(backingFile) to \(size) bytes: \(String(cString: strerror(truncateErrno)))")
                }
            }

            var losetup = ["losetup", "--find", "--show"]
            if options.directIO { losetup.append("--direct-io=on") }
            if options.partitionScan { losetup.append("--partscan") }
            if options.readOnly { losetup.append("--read-only") }
            losetup.append(backingFile)
            let device = try Command.check(losetup).stdout.trimmingCharacters(in: .whitespacesAndNewlines)
            attached = device
            devicePath = device
            name = URL(fileURLWithPath: device).lastPathComponent
            // Trust the kernel, not losetup's output: the device must hold our file.
            let bound = (try? String(contentsOfFile: "/sys/block/\(name)/loop/backing_file", encoding: .utf8))?
                .trimmingCharacters(in: .newlines)
            guard bound == backingFile else {
                attached = nil
                throw LoopCardError(description: "losetup reported \(device) for \(backingFile), but it is attached to \(bound ?? "nothing")")
            }
            let numbers = try String(contentsOfFile: "/sys/block/\(name)/dev", encoding: .utf8)
                .trimmingCharacters(in: .whitespacesAndNewlines).split(separator: ":")
            guard numbers.count == 2, let major = UInt32(numbers[0]), let minor = UInt32(numbers[1]) else {
                throw LoopCardError(description: "unreadable /sys/block/\(name)/dev")
            }
            self.major = major
            self.minor = minor
        } catch {
            if let attached { _ = try? Command.run(["losetup", "--detach", attached]) }
            if existingFile == nil { unlink(backingFile) }
            if ownsDirectory { rmdir(self.directory) }
            throw error
        }
        // A card detached lazily while throttled (pulled mid-write, say) cannot drop its
        // rule safely later (the node may be someone else's by then), so a rule keyed by
        // this MAJ:MIN may be left over. The node is ours now: start unthrottled.
        for direction in ["write", "read"] where Self.hasThrottleRule(direction, major: major, minor: minor) {
            try? writeThrottle(direction, 0)
        }
        if options.partitionScan {
            do { try rescanPartitions() } catch {
                close()
                throw error
            }
        }
    }

    deinit { close() }

    /// True while /dev/loopN is attached to this card's file (also during a lazy detach,
    /// until the last opener closes it).
    public var isAttached: Bool {
        guard let current = try? String(contentsOfFile: "/sys/block/\(name)/loop/backing_file", encoding: .utf8)
        else { return false }
        let path = current.trimmingCharacters(in: .newlines)
        return path == backingFile || path == backingFile + " (deleted)"
    }

    /// The kernel's disk sequence number of the attached card (a new one at every attach).
    public var diskSequence: UInt64? {
        (try? String(contentsOfFile: "/sys/block/\(name)/diskseq", encoding: .utf8))
            .flatMap { UInt64($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
    }

    /// Size of the device in bytes as the kernel sees it now (0 after `pull()`).
    public var deviceSize: Int64 {
        let sectors = (try? String(contentsOfFile: "/sys/block/\(name)/size", encoding: .utf8))
            .flatMap { Int64($0.trimmingCharacters(in: .whitespacesAndNewlines)) } ?? 0
        return sectors * 512
    }

    /// Makes the partitions of the image on the card appear as /dev/loopNpM (after a test
    /// wrote a new image, for example). `partx --update` uses BLKPG, so it works on kernels
    /// without partition parsers; a card without a partition table is not an error.
    ///
    /// Mind udevd's watch (60-block.rules): when anything that had the card open for
    /// writing closes it (losetup itself, dd, the daemon), udevd calls BLKRRPART, and on a
    /// kernel without partition parsers that removes every partition partx added. So this
    /// waits for udevd to be idle first and checks the result, and a test that writes to
    /// the card afterwards must call it again (or hold flock(LOCK_SH) on the card while it
    /// needs the partitions: udevd skips the rescan of a locked disk).
    public func rescanPartitions() throws {
        try requireAttached("rescan partitions")
        let udevdRuns = Udevd.ping()
        for _ in 0..<5 {
            if udevdRuns { try Udevd.control(["udevadm", "settle", "--timeout=30"]) }
            let output = try Command.run(["partx", "--update", devicePath])
            if !output.succeeded {
                if output.stderr.contains("failed to read partition table") { return }
                throw LoopCardError(description: "partition rescan of \(devicePath) failed: \(output)")
            }
            if udevdRuns { try Udevd.control(["udevadm", "settle", "--timeout=30"]) }
            let expected = try Command.run(["partx", "--show", "--noheadings", "--output", "NR", devicePath])
                .stdout.split(separator: "\n").count
            if partitionCount == expected { return }
        }
        throw LoopCardError(description: "the partitions of \(devicePath) keep disappearing (udevd rescans the "
            + "card as partx adds them); is something writing to it?")
    }

    /// Number of partitions the kernel shows for the card (loopNpM in sysfs).
    public var partitionCount: Int {
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/sys/block/\(name)")) ?? []
        return entries.filter { $0.hasPrefix(name + "p") }.count
    }

    /// Limits the card's speed with the cgroup v1 blkio throttle of the root cgroup (the
    /// cgroup every process of this machine runs in): `MAJ:MIN BPS` into
    /// blkio.throttle.write_bps_device / read_bps_device. Nil leaves that direction alone.
    /// Undone by `removeThrottle()`, `detach()` and `close()`. Applies to O_DIRECT I/O at
    /// once, and to buffered writes when they are written back.
    public func throttle(writeBytesPerSecond: UInt64?, readBytesPerSecond: UInt64? = nil) throws {
        try requireAttached("throttle")
        if let bps = writeBytesPerSecond { try writeThrottle("write", bps) }
        if let bps = readBytesPerSecond { try writeThrottle("read", bps) }
        state.withLock { $0.throttled = true }
    }

    /// Removes both throttles of this device (a value of 0 deletes the rule).
    public func removeThrottle() throws {
        guard state.withLock({ $0.throttled }) else { return }
        // After a lazy detach loopN may already belong to another test's card: its
        // throttle (keyed by MAJ:MIN) is not ours to clear.
        guard isAttached else {
            state.withLock { $0.throttled = false }
            return
        }
        try writeThrottle("write", 0)
        try writeThrottle("read", 0)
        state.withLock { $0.throttled = false }
    }

    /// SHA-256 (hex) of the card's content as read back from the device with O_DIRECT,
    /// bypassing the page cache: the whole device, or its first `bytes` bytes (a multiple
    /// of 512).
    public func sha256(bytes: Int64? = nil) throws -> String {
        try requireAttached("hash")
        return try Self.hash(path: devicePath, bytes: bytes, direct: true)
    }

    /// SHA-256 (hex) of the backing file: what reached the "card", also after `pull()`.
    public func backingFileSHA256(bytes: Int64? = nil) throws -> String {
        try Self.hash(path: backingFile, bytes: bytes, direct: false)
    }

    /// Pulls the card out of its slot while it may be in use.
    ///
    /// What a writer sees (measured on Linux 6.18, O_DIRECT writer, `--direct-io=on`):
    /// writes already in the loop driver complete; a write that the blkio throttle was
    /// still holding fails with EIO (it reaches the loop driver after the change); every
    /// later pwrite fails at once with ENOSPC (the device is now 0 bytes long); reads
    /// return 0 bytes; fdatasync succeeds. So a writer must treat EIO and ENOSPC alike and
    /// then look at the device (size 0, or gone) to say "card removed". udev
    /// gets a `change` event (size 0, still tagged, like a card reader whose card was
    /// taken out) and, when the last opener closes the device, a second `change` without
    /// loop/backing_file, after which the device is no longer tagged `provision`.
    ///
    /// How: LOOP_SET_STATUS64 moves the loop's offset past the end of the file, which
    /// makes the device 0 bytes long atomically without touching the file (what was
    /// written stays there for `backingFileSHA256`); then a synthetic `change` uevent;
    /// then `losetup --detach`, which the kernel defers while the device is open.
    /// Plain `losetup --detach` alone is not enough: on a busy device it only sets
    /// autoclear, and the writer goes on writing successfully until it closes.
    public func pull() throws {
        try requireAttached("pull")
        let fd = open(devicePath, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            throw LoopCardError(description: "cannot open \(devicePath) to pull the card: \(String(cString: strerror(errno)))")
        }
        var status = [UInt8](repeating: 0, count: Self.loopInfo64Size)
        let failure: String? = status.withUnsafeMutableBytes { raw -> String? in
            guard ioctl(fd, Self.loopGetStatus64, raw.baseAddress!) == 0 else {
                return "LOOP_GET_STATUS64: \(String(cString: strerror(errno)))"
            }
            raw.storeBytes(of: UInt64(1 << 62).littleEndian, toByteOffset: Self.offsetOfLoOffset, as: UInt64.self)
            // The kernel drains the queue before changing the offset and may ask to retry.
            for _ in 0..<50 {
                if ioctl(fd, Self.loopSetStatus64, raw.baseAddress!) == 0 { return nil }
                guard errno == EAGAIN || errno == EBUSY else { break }
                usleep(20_000)
            }
            return "LOOP_SET_STATUS64: \(String(cString: strerror(errno)))"
        }
        Glibc.close(fd)
        if let failure {
            throw LoopCardError(description: "cannot pull \(devicePath): \(failure)")
        }
        try? "change".write(toFile: "/sys/block/\(name)/uevent", atomically: false, encoding: .utf8)
        try detach(waitingUpTo: .zero)
    }

    /// Detaches the card (lazily when the device is still open: the kernel then frees it at
    /// the last close). Drops the throttle first so that the next user of loopN is not
    /// slowed down. Safe to call again, and after the device went to someone else.
    ///
    /// Waits up to `timeout` for the kernel to let go of the device: right after a write,
    /// udevd's probe of the card (blkid) holds it open for a moment, so even a card
    /// nobody uses detaches lazily. A card still held after `timeout` stays attached until
    /// its holder closes it; this returns anyway (see `isAttached`).
    public func detach(waitingUpTo timeout: Duration = .seconds(10)) throws {
        try removeThrottle()
        guard isAttached else { return }
        let output = try Command.run(["losetup", "--detach", devicePath])
        if !output.succeeded && isAttached {
            throw LoopCardError(description: "cannot detach \(devicePath) (\(backingFile)): \(output)")
        }
        let deadline = ContinuousClock.now.advanced(by: timeout)
        while isAttached && ContinuousClock.now < deadline { usleep(20_000) }
    }

    /// Detaches, drops the throttle, deletes the backing file and the temporary directory.
    /// Never throws: it runs from deinit too. Idempotent.
    public func close() {
        let first = state.withLock { state -> Bool in
            defer { state.closed = true }
            return !state.closed
        }
        guard first else { return }
        try? detach()
        if ownsFile { unlink(backingFile) }
        if ownsDirectory { rmdir(directory) }
    }

    // MARK: - Private

    private func requireAttached(_ what: String) throws {
        guard isAttached else {
            throw LoopCardError(description: "cannot \(what) card \(label): \(devicePath) is no longer attached to \(backingFile)")
        }
    }

    private func writeThrottle(_ direction: String, _ bytesPerSecond: UInt64) throws {
        let file = "/sys/fs/cgroup/blkio/blkio.throttle.\(direction)_bps_device"
        guard access(file, W_OK) == 0 else {
            throw LoopCardError(description: "cannot throttle \(devicePath): \(file) is missing; the blkio "
                + "controller of cgroup v1 must be mounted at /sys/fs/cgroup/blkio")
        }
        do {
            try "\(major):\(minor) \(bytesPerSecond)\n".write(toFile: file, atomically: false, encoding: .utf8)
        } catch {
            throw LoopCardError(description: "cannot write the \(direction) throttle of \(devicePath) to \(file): \(error)")
        }
    }

    private static func hasThrottleRule(_ direction: String, major: UInt32, minor: UInt32) -> Bool {
        let file = "/sys/fs/cgroup/blkio/blkio.throttle.\(direction)_bps_device"
        guard let rules = try? String(contentsOfFile: file, encoding: .utf8) else { return false }
        return rules.split(separator: "\n").contains { $0.hasPrefix("\(major):\(minor) ") }
    }

    private static func hash(path: String, bytes: Int64?, direct: Bool) throws -> String {
        var dd = "dd if=\"$1\" bs=1M status=none"
        if direct { dd += " iflag=direct" }
        if let bytes {
            guard bytes % 512 == 0 else {
                throw LoopCardError(description: "hash length \(bytes) of \(path) is not a multiple of 512")
            }
            dd += direct ? ",count_bytes count=\(bytes)" : " iflag=count_bytes count=\(bytes)"
        }
        let output = try Command.check(["bash", "-c", "set -o pipefail; \(dd) | sha256sum", "hash", path])
        guard let digest = output.stdout.split(separator: " ").first, digest.count == 64 else {
            throw LoopCardError(description: "unexpected sha256sum output for \(path): \(output.stdout)")
        }
        return String(digest)
    }

    // <linux/loop.h>: struct loop_info64 is 232 bytes, lo_offset at byte 24.
    private static let loopInfo64Size = 232
    private static let offsetOfLoOffset = 24
    private static let loopGetStatus64: UInt = 0x4C05
    private static let loopSetStatus64: UInt = 0x4C04
}
