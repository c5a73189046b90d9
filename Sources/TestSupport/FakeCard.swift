// A card that lies, for tests: a loop device (O_DIRECT) over a file served by
// tools/fake-card/fake-card-fuse.c, a FUSE program of our own that keeps fewer bytes than
// the card claims (wrapping writes past its real size onto earlier offsets, or dropping
// them and reading zeros) and can return a byte inverted on the first read of it, or on
// every read. Its code shares nothing with what it tests: the probe and the verifier see
// only a block device.
//
// Caches cannot hide the lie: the FUSE file is direct_io (the kernel keeps no page cache
// of it, so every read reaches the program) and the loop device writes and reads it with
// O_DIRECT (checked after attaching).
//
// The program is compiled on first use (cc with pkg-config fuse3; `make test` installs
// libfuse3-dev and fuse3) into /tmp, keyed by a hash of its source. Lifetime: `close()`
// detaches the loop device, unmounts (the FUSE process exits on unmount) and deletes the
// store; deinit does the same as a safety net.

#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Synchronization

public final class FakeCard: Sendable {
    /// How the card handles bytes past its real capacity.
    public enum Lie: Sendable, Equatable {
        /// Keeps every byte it claims (a control).
        case honest
        /// Stores `realSize` bytes; byte P lands on P mod realSize.
        case wraps(realSize: Int64)
        /// Stores `realSize` bytes; writes past it vanish and read back as zeros.
        case drops(realSize: Int64)
    }

    /// A byte that reads back wrong, once it was written.
    public enum Flip: Sendable, Equatable {
        case none
        /// The first read of the byte at this offset after it was written returns it inverted.
        case once(at: Int64)
        /// Every read of it after it was written does.
        case always(at: Int64)
    }

    public let card: LoopCard
    public let claimedSize: Int64
    public let lie: Lie
    /// The bytes the card really keeps.
    public var realSize: Int64 {
        switch lie {
        case .honest: claimedSize
        case .wraps(let real), .drops(let real): real
        }
    }
    public var devicePath: String { card.devicePath }

    private let directory: String
    private let mountPoint: String
    private let closed = Mutex(false)

    /// Mounts a fake card of `claimedSize` bytes and attaches a loop device to it.
    public init(label: String, claimedSize: Int64, lie: Lie, flip: Flip = .none) throws {
        self.claimedSize = claimedSize
        self.lie = lie
        let program = try Self.program()
        var template = Array("/tmp/provision-fake-XXXXXX".utf8CString)
        guard let made = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else {
            throw LoopCardError(description: "cannot create a temporary directory in /tmp: \(String(cString: strerror(errno)))")
        }
        directory = String(cString: made)
        mountPoint = directory + "/mnt"
        let safe = String(label.map { $0.isLetter || $0.isNumber || "._-".contains($0) ? $0 : "_" })
        let name = "provision-card-\(safe)-\(String(UInt64.random(in: 0...UInt64.max), radix: 36)).img"
        var arguments = [program, mountPoint, "-s", "-o", "allow_other,fsname=provision-fake-card",
                         "--store=\(directory)/store", "--name=\(name)", "--claimed=\(claimedSize)"]
        switch lie {
        case .honest: arguments.append("--lie=honest")
        case .wraps(let real): arguments += ["--lie=wrap", "--real=\(real)"]
        case .drops(let real): arguments += ["--lie=drop", "--real=\(real)"]
        }
        switch flip {
        case .none: break
        case .once(let at): arguments.append("--flip=once:\(at)")
        case .always(let at): arguments.append("--flip=always:\(at)")
        }
        var mounted = false
        do {
            guard mkdir(mountPoint, 0o755) == 0 else {
                throw LoopCardError(description: "cannot create \(mountPoint): \(String(cString: strerror(errno)))")
            }
            // Without -f the program returns once the mount is up (and serves from a
            // daemonised child until it is unmounted): no waiting on a condition needed.
            try Command.check(arguments, timeout: .seconds(30))
            mounted = true
            card = try LoopCard(label: safe, size: claimedSize, existingFile: "\(mountPoint)/\(name)")
            let dio = try Command.check(["losetup", "--list", "--noheadings", "--output", "DIO", card.devicePath])
            guard dio.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "1" else {
                card.close()
                throw LoopCardError(description: "the loop device over the fake card does not use direct I/O: the page cache would hide its lie")
            }
        } catch {
            if mounted { _ = try? Command.run(["umount", mountPoint]) }
            _ = try? Command.run(["rm", "-rf", directory])
            throw error
        }
    }

    deinit { close() }

    /// Detaches, unmounts, deletes the store. Idempotent; never throws.
    public func close() {
        let first = closed.withLock { was -> Bool in
            defer { was = true }
            return !was
        }
        guard first else { return }
        card.close()
        // A loop device still held by someone keeps the file open: unmount lazily then.
        if (try? Command.run(["umount", mountPoint]))?.succeeded != true {
            _ = try? Command.run(["umount", "--lazy", mountPoint])
        }
        rmdir(mountPoint)
        unlink(directory + "/store")
        rmdir(directory)
    }

    // MARK: - The FUSE program

    private static let built = Mutex<String?>(nil)

    /// Path of the compiled FUSE program, built once per source version.
    static func program() throws -> String {
        try built.withLock { cached in
            if let cached { return cached }
            let source = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
                .appendingPathComponent("../../tools/fake-card/fake-card-fuse.c").standardized.path
            guard let text = FileManager.default.contents(atPath: source) else {
                throw LoopCardError(description: "cannot read the fake card's FUSE program at \(source)")
            }
            // FNV-1a of the source: a new source, a new binary.
            let digest = String(text.reduce(UInt64(0xcbf2_9ce4_8422_2325)) { ($0 ^ UInt64($1)) &* 0x100_0000_01b3 }, radix: 16)
            let binary = "/tmp/provision-fake-card-fuse-\(digest)"
            if access(binary, X_OK) != 0 {
                // Built under a name of its own and renamed: parallel test processes never
                // run a half-written binary.
                let partial = binary + ".\(getpid()).partial"
                let flags = try Command.check(["pkg-config", "--cflags", "--libs", "fuse3"]).stdout
                    .split(whereSeparator: \.isWhitespace).map(String.init)
                try Command.check(["cc", "-O2", "-Wall", "-o", partial, source] + flags, timeout: .seconds(120))
                guard rename(partial, binary) == 0 else {
                    throw LoopCardError(description: "cannot move \(partial) to \(binary): \(String(cString: strerror(errno)))")
                }
            }
            cached = binary
            return binary
        }
    }
}
