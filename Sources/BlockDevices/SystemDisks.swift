#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// Which block devices the running system is using: mounted filesystems, swap, and
/// everything underneath them (partitions' parent disks, device-mapper and md slaves).
/// Read fresh from /proc and sysfs for every verdict — a card mounted a second ago counts.
public struct SystemDiskUsage: Sendable {
    /// Why a device number is in use, e.g. "mounted at /boot", "holds /", "swap".
    public private(set) var uses: [UInt64: [String]] = [:]

    public static func current() -> SystemDiskUsage {
        var usage = SystemDiskUsage()
        if let mountinfo = try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8) {
            for line in mountinfo.split(separator: "\n") {
                let f = line.split(separator: " ")
                guard f.count > 4 else { continue }
                let mm = f[2].split(separator: ":").compactMap { UInt32($0) }
                guard mm.count == 2, mm[0] != 0 else { continue }  // major 0: virtual filesystems
                let point = String(f[4]).replacingOccurrences(of: "\\040", with: " ")
                usage.add(devnum: makeDevnum(mm[0], mm[1]), reason: point == "/" ? "holds / (the system disk)" : "mounted at \(point)")
            }
        }
        if let swaps = try? String(contentsOfFile: "/proc/swaps", encoding: .utf8) {
            for line in swaps.split(separator: "\n").dropFirst() {
                guard let dev = line.split(separator: " ").first else { continue }
                var st = stat()
                if stat(String(dev), &st) == 0, (st.st_mode & S_IFMT) == S_IFBLK {
                    usage.add(devnum: UInt64(st.st_rdev), reason: "used as swap")
                }
            }
        }
        return usage
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
