#if canImport(Glibc)
import Glibc
#endif
import BlockDevices
import Foundation
import ImageIO
import ProvisionCShims

/// One piece of media: the node's device number and the kernel's disk sequence, which
/// changes when another card goes into the same reader slot. The only implementation of the
/// "same media" rule (DESIGN.md §3, rule 6), for the daemon and the CLI alike.
public struct MediaIdentity: Sendable, Equatable, CustomStringConvertible {
    public let deviceNumber: UInt64
    public let diskSequence: UInt64?

    public init(deviceNumber: UInt64, diskSequence: UInt64?) {
        self.deviceNumber = deviceNumber
        self.diskSequence = diskSequence
    }

    public init(_ facts: DeviceFacts) {
        self.init(deviceNumber: facts.deviceNumber, diskSequence: facts.diskSequence)
    }

    public var description: String {
        let major = (deviceNumber >> 8) & 0xfff | (deviceNumber >> 32) & ~0xfff
        let minor = deviceNumber & 0xff | (deviceNumber >> 12) & ~0xff
        return "device \(major):\(minor)" + (diskSequence.map { " disk sequence \($0)" } ?? "")
    }

    /// Throws unless the open `target` holds this media now. A verdict with a disk sequence
    /// is not satisfied by a device without one (and the other way round): both come from
    /// the same kernel, so a difference means a different device.
    func check(_ target: WriteTarget, before what: String) throws(ImageIOError) {
        let now = MediaIdentity(deviceNumber: target.deviceNumber ?? 0, diskSequence: target.currentDiskSequence)
        guard now == self else {
            throw ImageIOError(.deviceChanged, "\(target.path) now holds a different card (\(now)) than the one checked (\(self)); nothing was \(what)")
        }
    }
}

/// Opens a card and judges it on its descriptor: the safety policy applied to the facts of
/// the device the descriptor names (its device number from `fstat`), never to whatever the
/// path named a moment earlier.
enum OpenedCard {
    static func open(_ job: CardJob, minimumSize: UInt64?) throws(CardFailure) -> (WriteTarget, DeviceFacts?) {
        let target: WriteTarget
        let station: Bool
        if case .station = job.policy?.mode { station = true } else { station = false }
        do throws(ImageIOError) {
            target = try WriteTarget.open(path: job.target, followSymlinks: job.followSymlinks, createFile: !station)
        } catch {
            throw CardFailure(error)
        }
        guard target.kind == .blockDevice, let deviceNumber = target.deviceNumber else {
            if station {
                target.close()
                throw CardFailure(.refused, "refusing to write \(job.target): not a block device (the station writes cards only)")
            }
            return (target, nil)
        }
        do throws(CardFailure) {
            let facts: DeviceFacts
            do throws(BlockDeviceError) { facts = try DeviceFacts.read(deviceNumber: deviceNumber, fallbackNode: job.target) } catch {
                throw CardFailure(.refused, "refusing to write \(job.target): \(error.message)")
            }
            if let policy = job.policy {
                try judge(facts, by: policy, minimumSize: minimumSize, path: job.target)
            }
            if let expected = job.expectedMedia {
                do throws(ImageIOError) { try expected.check(target, before: "written") } catch { throw CardFailure(error) }
            }
            return (target, facts)
        } catch {
            target.close()
            throw error
        }
    }

    /// A refusal for one reason that has an error of its own (too small, write-protected)
    /// is that error, for exit codes; any other is "refused" with every reason.
    private static func judge(_ facts: DeviceFacts, by policy: SafetyPolicy, minimumSize: UInt64?, path: String) throws(CardFailure) {
        let refusals = policy.refusals(for: facts, minimumSize: minimumSize)
        guard !refusals.isEmpty else { return }
        if refusals.count == 1, let only = refusals.first {
            switch only.rule {
            case .tooSmall: throw CardFailure(.image(.deviceTooSmall), only.reason + " (\(path))")
            case .readOnly: throw CardFailure(.image(.deviceReadOnly), "\(path) is \(only.reason)")
            default: break
            }
        }
        throw refused("write", path, facts, refusals)
    }

    /// "refusing to VERB PATH (what it is):" and one line a reason.
    static func refused(_ verb: String, _ path: String, _ facts: DeviceFacts, _ refusals: [SafetyPolicy.Refusal]) -> CardFailure {
        CardFailure(.refused, "refusing to \(verb) \(path) (\(facts.summary)):\n" + refusals.map { "  - \($0.reason)" }.joined(separator: "\n"))
    }
}

/// `provision inject` on a block device: the device is judged on an opened descriptor by
/// the same safety policy as `provision write` (a card: removable, on USB or MMC, or a loop
/// device; not mounted, not swap, not a system disk; not write-protected), and injection and
/// `e2fsck` then open that descriptor's device (see `MediaGuard`), whatever the path names by
/// then. An image file is not judged (nil): it is nobody's disk.
public enum InjectionTarget {
    public final class Judged: Sendable {
        let guarded: MediaGuard
        init(_ guarded: MediaGuard) { self.guarded = guarded }
        /// The path injection opens, in this process.
        public var path: String { guarded.path }
        /// The path a child process (e2fsck) opens.
        public var pathForChild: String { guarded.pathForChild }
        /// Messages name the device, not the /proc path.
        public func describe(_ message: String) -> String { guarded.describe(message) }
    }

    public static func judge(_ path: String) throws(CardFailure) -> Judged? {
        let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        // What cannot be opened here is for the injector to report, as for any file.
        guard fd >= 0 else { return nil }
        var st = stat()
        guard fstat(fd, &st) == 0, st.st_mode & S_IFMT == S_IFBLK else {
            Glibc.close(fd)
            return nil
        }
        let facts: DeviceFacts
        do throws(BlockDeviceError) { facts = try DeviceFacts.read(deviceNumber: UInt64(st.st_rdev), fallbackNode: path) } catch {
            Glibc.close(fd)
            throw CardFailure(.refused, "refusing to inject into \(path): \(error.message)")
        }
        let refusals = SafetyPolicy(mode: .offline).refusals(for: facts, minimumSize: nil)
        guard refusals.isEmpty else {
            Glibc.close(fd)
            throw OpenedCard.refused("inject into", path, facts, refusals)
        }
        return Judged(MediaGuard(fd: fd, shownAs: path, media: nil))
    }
}

/// A second, read-only, non-exclusive descriptor on the written device, held from the write
/// to the end of the check. Injection and `e2fsck` open the device through it
/// (`/proc/self/fd/N`), after the writer's exclusive descriptor is closed (libext2fs claims
/// the device exclusively itself): whatever the device node names by then, they open the
/// device that was written, and its disk sequence says whether the card is still the same.
final class MediaGuard: @unchecked Sendable {
    let fd: Int32
    let shownAs: String
    private let media: MediaIdentity?

    convenience init(target: WriteTarget, media: MediaIdentity?) throws(CardFailure) {
        let fd = Glibc.open("/proc/self/fd/\(target.fd)", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            throw CardFailure(.image(.ioError), "cannot open \(target.path) again for injection: \(String(cString: strerror(errno)))")
        }
        self.init(fd: fd, shownAs: target.path, media: media)
    }

    /// Takes `fd` (closed with this guard).
    init(fd: Int32, shownAs: String, media: MediaIdentity?) {
        self.fd = fd
        self.shownAs = shownAs
        self.media = media
    }

    deinit { Glibc.close(fd) }

    /// The path injection opens (this process).
    var path: String { "/proc/self/fd/\(fd)" }
    /// The path a child process (e2fsck) opens.
    var pathForChild: String { "/proc/\(getpid())/fd/\(fd)" }

    /// Messages name the device, not the /proc path.
    func describe(_ message: String) -> String {
        message.replacingOccurrences(of: pathForChild, with: shownAs).replacingOccurrences(of: path, with: shownAs)
    }

    func checkStillSame(before what: String) throws(CardFailure) {
        guard let media else { return }
        var seq: UInt64 = 0
        let now = provision_blk_diskseq(fd, &seq) == 0 ? seq : nil
        var size: UInt64 = 0
        let present = provision_blk_getsize64(fd, &size) == 0 && size > 0
        guard present else {
            throw CardFailure(.image(.deviceRemoved), "\(shownAs) was removed before \(what): the card is written but has no accounts")
        }
        guard now == media.diskSequence else {
            throw CardFailure(.image(.deviceChanged), "\(shownAs) now holds a different card than the one written; nothing was \(what)")
        }
    }
}
