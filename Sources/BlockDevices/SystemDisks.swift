#if canImport(Glibc)
import Glibc
#endif
import Foundation
import SystemPackage

/// Which block devices the running system is using: mounted filesystems, swap, and
/// everything underneath them (partitions' parent disks, device-mapper and md slaves).
/// Read fresh from /proc and sysfs for every verdict — a card mounted a second ago counts.
public struct SystemDiskUsage: Sendable {
    /// Why a device number is in use, e.g. "mounted at /boot", "holds /", "swap".
    public private(set) var uses: [UInt64: [String]] = [:]

    /// What could not be read, e.g. "cannot read /proc/self/mountinfo (Permission denied)":
    /// then nothing is known about what is mounted, and the policy refuses every device.
    public private(set) var unreadable: [String] = []

    public static func current(mountinfo: String = "/proc/self/mountinfo", swaps: String = "/proc/swaps") -> SystemDiskUsage {
        var usage = SystemDiskUsage()
        switch readProcFile(mountinfo) {
        case .success(let text):
            for mount in MountInfo.parse(text) {
                // btrfs names its disk only as SOURCE (its device number is anonymous, 0:N):
                // without it a card with a mounted btrfs passed the policy, and only O_EXCL's
                // EBUSY kept the station from writing under a live filesystem. A SOURCE that
                // merely looks like a disk (a tmpfs mounted as "/dev/sdb1") refuses that disk:
                // the safe way to be wrong.
                guard let devnum = mount.device ?? mount.source.flatMap(blockDevice(at:)) else { continue }
                usage.add(devnum: devnum, reason: mount.point == "/" ? "holds / (the system disk)" : "mounted at \(mount.point)")
            }
        case .failure(let errno):
            // Knowing nothing of the mounts, every card could be one: refuse rather than let
            // only O_EXCL stand between the station and a live filesystem.
            usage.unreadable.append("cannot read \(mountinfo) (\(errno.description))")
        }
        switch readProcFile(swaps) {
        case .success(let text):
            // "Filename Type Size Used Priority", a header line first; names escaped as in mountinfo.
            for line in text.split(separator: UInt8(ascii: "\n")).dropFirst() {
                guard let name = line.split(separator: UInt8(ascii: " ")).first,
                      let devnum = blockDevice(at: MountInfo.unescape(name)) else { continue }
                usage.add(devnum: devnum, reason: "used as swap")
            }
        case .failure(.noSuchFileOrDirectory):
            break  // a kernel without swap support has no /proc/swaps, and no swap
        case .failure(let errno):
            usage.unreadable.append("cannot read \(swaps) (\(errno.description))")
        }
        return usage
    }

    /// The device number of the block device node at `path`, if that is one.
    static func blockDevice(at path: String) -> UInt64? {
        var st = stat()
        guard stat(path, &st) == 0, (st.st_mode & S_IFMT) == S_IFBLK else { return nil }
        return UInt64(st.st_rdev)
    }

    /// A /proc file's bytes (its size reads as 0: read to the end). The seam is swift-system's
    /// `FileDescriptor`, which retries EINTR.
    static func readProcFile(_ path: String) -> Result<[UInt8], Errno> {
        do {
            let fd = try FileDescriptor.open(FilePath(path), .readOnly, options: .closeOnExec)
            return .success(try fd.closeAfter {
                var bytes: [UInt8] = []
                var chunk = [UInt8](repeating: 0, count: 16 << 10)
                while true {
                    let n = try chunk.withUnsafeMutableBytes { try fd.read(into: $0) }
                    if n == 0 { return bytes }
                    bytes.append(contentsOf: chunk[..<n])
                }
            })
        } catch let errno as Errno {
            return .failure(errno)
        } catch {
            return .failure(.ioError)  // FileDescriptor throws only Errno
        }
    }

    public func reasons(for devnum: UInt64) -> [String] { uses[devnum] ?? [] }

    /// Records the device and, transitively, the disks under it: a mounted partition makes
    /// its whole disk off-limits, and a mounted LVM volume makes every disk under it so.
    private mutating func add(devnum: UInt64, reason: String, depth: Int = 0) {
        guard depth < 16 else { return }
        uses[devnum, default: []].append(reason)
        let sys = "/sys/dev/block/\(devnumMajor(devnum)):\(devnumMinor(devnum))"
        if FileManager.default.fileExists(atPath: sys + "/partition"),
           let parent = try? String(contentsOfFile: sys + "/../dev", encoding: .utf8), let d = parseDevnum(parent) {
            add(devnum: d, reason: reason, depth: depth + 1)
        }
        for slave in (try? FileManager.default.contentsOfDirectory(atPath: sys + "/slaves")) ?? [] {
            if let text = try? String(contentsOfFile: "\(sys)/slaves/\(slave)/dev", encoding: .utf8), let d = parseDevnum(text) {
                add(devnum: d, reason: reason, depth: depth + 1)
            }
        }
    }
}

func makeDevnum(_ major: UInt32, _ minor: UInt32) -> UInt64 {
    (UInt64(major & 0xfff) << 8) | (UInt64(major & ~0xfff) << 32) | UInt64(minor & 0xff) | (UInt64(minor & ~0xff) << 12)
}
func devnumMajor(_ d: UInt64) -> UInt32 { UInt32((d >> 8) & 0xfff) | UInt32((d >> 32) & ~0xfff) }
func devnumMinor(_ d: UInt64) -> UInt32 { UInt32(d & 0xff) | UInt32((d >> 12) & ~0xff) }
func parseDevnum(_ text: String) -> UInt64? {
    let mm = text.trimmingCharacters(in: .whitespacesAndNewlines).split(separator: ":").compactMap { UInt32($0) }
    return mm.count == 2 ? makeDevnum(mm[0], mm[1]) : nil
}

/// `/proc/self/mountinfo`'s lines (proc(5)): "ID PARENT MAJOR:MINOR ROOT MOUNTPOINT OPTIONS
/// [OPTIONAL…] - FSTYPE SOURCE SUPEROPTIONS", space-separated, with space, tab, newline and
/// backslash in names written as `\ooo` (octal).
struct MountInfo: Equatable {
    /// The filesystem's device, from MAJOR:MINOR; nil for major 0 (an anonymous device:
    /// virtual filesystems, and btrfs, whose mounts name `0:N` and the disk only as SOURCE).
    var device: UInt64?
    var point: String
    /// SOURCE when it is a path under /dev (a btrfs on a card: "/dev/sdb1").
    var source: String?

    static func parse(_ text: [UInt8]) -> [MountInfo] {
        text.split(separator: UInt8(ascii: "\n")).compactMap { line in
            let f = line.split(separator: UInt8(ascii: " "))
            guard f.count >= 5 else { return nil }
            guard let devnum = parseDevnum(String(decoding: f[2], as: UTF8.self)) else { return nil }
            // SOURCE follows FSTYPE after the lone "-" that ends the optional fields.
            let dash = f[5...].firstIndex { $0.elementsEqual([UInt8(ascii: "-")]) }
            let source = dash.flatMap { $0 + 2 < f.count ? unescape(f[$0 + 2]) : nil }
            return MountInfo(device: devnumMajor(devnum) == 0 ? nil : devnum, point: unescape(f[4]),
                             source: source.flatMap { $0.hasPrefix("/dev/") ? $0 : nil })
        }
    }

    /// Undoes the kernel's `\ooo` escapes.
    static func unescape(_ field: some Collection<UInt8>) -> String {
        let bytes = Array(field)
        var out: [UInt8] = []
        out.reserveCapacity(bytes.count)
        var i = 0
        while i < bytes.count {
            let octal = UInt8(ascii: "0")...UInt8(ascii: "7")
            if bytes[i] == UInt8(ascii: "\\"), i + 3 < bytes.count, bytes[(i + 1)...(i + 3)].allSatisfy(octal.contains),
               bytes[i + 1] <= UInt8(ascii: "3") {
                out.append((bytes[i + 1] - 48) << 6 | (bytes[i + 2] - 48) << 3 | (bytes[i + 3] - 48))
                i += 4
            } else {
                out.append(bytes[i])
                i += 1
            }
        }
        return String(decoding: out, as: UTF8.self)
    }
}
