#if canImport(Glibc)
import Glibc
#endif
import CUdev
import Foundation

/// What provision knows about one block device: read from sysfs and the udev database
/// through libudev, never by opening the device.
public struct DeviceFacts: Sendable, Codable, Equatable {
    public var devnode: String
    public var sysname: String
    public var syspath: String
    /// major:minor as one number (makedev), the identity of the node.
    public var deviceNumber: UInt64
    public var isPartition: Bool
    public var size: UInt64
    public var logicalBlockSize: Int
    public var readOnly: Bool
    public var removable: Bool
    /// `usb`, `mmc`, `ata`, `loop`, … (udev ID_BUS, else guessed from the sysfs path).
    public var bus: String?
    public var vendor: String?
    public var model: String?
    public var serial: String?
    /// udev ID_PATH (the slot of a multi-slot reader), or `PROVISION_SLOT_PATH` set by
    /// provision's rules (loop cards get `loop:<backing file>`).
    public var slotPath: String?
    public var tags: [String]
    public var holders: [String]
    public var diskSequence: UInt64?
    public var loopBackingFile: String?

    public var isLoop: Bool { sysname.hasPrefix("loop") }
    public var major: UInt32 { UInt32((deviceNumber >> 8) & 0xfff) | UInt32((deviceNumber >> 32) & ~0xfff) }
    public var minor: UInt32 { UInt32(deviceNumber & 0xff) | UInt32((deviceNumber >> 12) & ~0xff) }

    /// A short human description: "SanDisk Ultra 29.7 GiB (serial 1234)".
    public var summary: String {
        let name = [vendor, model].compactMap { $0 }.joined(separator: " ")
        var s = name.isEmpty ? (isLoop ? "loop device" : "disk") : name
        s += " \(ByteCount.human(size))"
        if let serial { s += " serial \(serial)" }
        if let loopBackingFile { s += " backed by \(loopBackingFile)" }
        return s
    }

    /// Facts for the node at `path` (e.g. /dev/sdb), or nil when it is not a block device.
    public static func read(path: String) throws(BlockDeviceError) -> DeviceFacts {
        var st = stat()
        guard stat(path, &st) == 0 else {
            throw BlockDeviceError(.notFound, "\(path): no such device (\(String(cString: strerror(errno))))")
        }
        guard (st.st_mode & S_IFMT) == S_IFBLK else {
            throw BlockDeviceError(.notABlockDevice, "\(path) is not a block device")
        }
        return try read(deviceNumber: UInt64(st.st_rdev), fallbackNode: path)
    }

    /// Facts for the block device with this device number: what an opened descriptor's
    /// `fstat` names, so a verdict made from them is about the device actually open, whatever
    /// the path now points at.
    public static func read(deviceNumber: UInt64, fallbackNode: String) throws(BlockDeviceError) -> DeviceFacts {
        guard let udev = udev_new() else { throw BlockDeviceError(.notFound, "libudev is unavailable") }
        defer { udev_unref(udev) }
        guard let dev = udev_device_new_from_devnum(udev, Int8(UInt8(ascii: "b")), dev_t(deviceNumber)) else {
            throw BlockDeviceError(.notFound, "\(fallbackNode): the kernel has no sysfs entry for it")
        }
        defer { udev_device_unref(dev) }
        return DeviceFacts(udevDevice: dev, fallbackNode: fallbackNode)
    }

    /// Facts from a libudev device (enumeration or monitor).
    public init(udevDevice dev: OpaquePointer, fallbackNode: String? = nil) {
        func prop(_ k: String) -> String? { udev_device_get_property_value(dev, k).map { String(cString: $0) }.flatMap { $0.isEmpty ? nil : $0 } }
        func attr(_ k: String) -> String? { udev_device_get_sysattr_value(dev, k).map { String(cString: $0).trimmingCharacters(in: .whitespacesAndNewlines) }.flatMap { $0.isEmpty ? nil : $0 } }
        let syspath = String(cString: udev_device_get_syspath(dev))
        sysname = String(cString: udev_device_get_sysname(dev))
        self.syspath = syspath
        devnode = udev_device_get_devnode(dev).map { String(cString: $0) } ?? fallbackNode ?? "/dev/\(sysname)"
        deviceNumber = UInt64(udev_device_get_devnum(dev))
        isPartition = prop("DEVTYPE") == "partition" || attr("partition") != nil
        size = (attr("size").flatMap { UInt64($0) } ?? 0) * 512
        logicalBlockSize = attr("queue/logical_block_size").flatMap { Int($0) } ?? 512
        readOnly = attr("ro") == "1"
        removable = attr("removable") == "1"
        vendor = prop("ID_VENDOR") ?? attr("device/vendor")
        model = prop("ID_MODEL") ?? attr("device/model") ?? attr("device/name")
        serial = prop("ID_SERIAL_SHORT") ?? attr("device/serial") ?? prop("ID_SERIAL")
        slotPath = prop("PROVISION_SLOT_PATH") ?? prop("ID_PATH")
        var tags: [String] = []
        // CURRENT_TAGS: TAGS keeps a tag after the rule stopped matching (a card taken out).
        var entry = udev_device_get_current_tags_list_entry(dev)
        while let e = entry {
            tags.append(String(cString: udev_list_entry_get_name(e)))
            entry = udev_list_entry_get_next(e)
        }
        self.tags = tags
        loopBackingFile = attr("loop/backing_file")
        // Without udev's rules (no udevd), a loop card is still addressable by its file.
        if slotPath == nil, let backing = loopBackingFile { slotPath = "loop:" + backing }
        diskSequence = attr("diskseq").flatMap { UInt64($0) } ?? prop("DISKSEQ").flatMap { UInt64($0) }
        if let b = prop("ID_BUS") { bus = b }
        else if sysname.hasPrefix("loop") { bus = "loop" }
        else if syspath.contains("/usb") { bus = "usb" }
        else if syspath.contains("/mmc") { bus = "mmc" }
        else { bus = nil }
        holders = Self.holders(ofDiskAt: syspath)
    }

    /// What holds the disk or any of its partitions (`holders/` of each): device-mapper, RAID
    /// and LVM claim a partition, and only that partition's directory names them; the whole
    /// disk's open would fail "busy" without saying why. Partitions as `sdb1: dm-0`.
    static func holders(ofDiskAt syspath: String) -> [String] {
        let fm = FileManager.default
        var found = (try? fm.contentsOfDirectory(atPath: syspath + "/holders"))?.sorted() ?? []
        for entry in ((try? fm.contentsOfDirectory(atPath: syspath)) ?? []).sorted()
        where fm.fileExists(atPath: "\(syspath)/\(entry)/partition") {
            for holder in ((try? fm.contentsOfDirectory(atPath: "\(syspath)/\(entry)/holders")) ?? []).sorted() {
                found.append("\(entry): \(holder)")
            }
        }
        return found
    }
}

public struct BlockDeviceError: Error, CustomStringConvertible, Sendable {
    public enum Code: String, Sendable { case notFound, notABlockDevice, udev }
    public let code: Code
    public let message: String
    public init(_ code: Code, _ message: String) { self.code = code; self.message = message }
    public var description: String { message }
}
