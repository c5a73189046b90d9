/// The rules a device must pass before provision writes a single byte to it (DESIGN.md §3).
/// A lab appliance that writes automatically must never touch the wrong disk; each rule says
/// which disaster it prevents, and each refusal is shown to the operator with its reason.
public struct SafetyPolicy: Sendable {
    public enum Mode: Sendable, Equatable {
        /// The daemon: only devices tagged `provision` by the project's udev rules (or loop
        /// devices, when the station config enables them for tests and demos).
        case station(allowLoopDevices: Bool)
        /// `provision write`: a person named the device, but it must still look like a
        /// card — removable, on USB or MMC — or be a loop device.
        case offline
    }

    public var mode: Mode
    /// Largest device ever written: an external hard disk is not an SD card.
    public var maxDeviceSize: UInt64

    public init(mode: Mode, maxDeviceSize: UInt64 = 512 << 30) {
        self.mode = mode
        self.maxDeviceSize = maxDeviceSize
    }

    public struct Refusal: Sendable, Codable, Equatable, CustomStringConvertible {
        public enum Rule: String, Sendable, Codable {
            case partition, notEligible, inUse, noMedium, tooSmall, tooLarge, readOnly
        }
        public let rule: Rule
        public let reason: String
        public var description: String { reason }
        public init(rule: Rule, reason: String) {
            self.rule = rule
            self.reason = reason
        }
    }

    /// Every rule that fails, in order; empty means the device may be written.
    /// `minimumSize` is what the image needs (nil when not yet known).
    public func refusals(for d: DeviceFacts, minimumSize: UInt64?, usage: SystemDiskUsage = .current()) -> [Refusal] {
        var out: [Refusal] = []
        // 1. Writing a partition would leave a disk whose table no longer matches its content.
        if d.isPartition {
            out.append(.init(rule: .partition, reason: "\(d.devnode) is a partition; write the whole disk instead"))
        }
        // 2. Only devices that are provably card slots: a typo in a device name must not
        //    reach an internal disk.
        switch mode {
        case .station(let allowLoop):
            if d.isLoop {
                if !allowLoop { out.append(.init(rule: .notEligible, reason: "loop device and allow_loop_devices is off in the station config")) }
            } else if !d.tags.contains("provision") {
                out.append(.init(rule: .notEligible, reason: "not a card slot: not tagged 'provision' by udev-rules/70-provision.rules (removable USB/MMC disks only)"))
            }
        case .offline:
            if !d.isLoop && !d.removable && d.bus != "usb" && d.bus != "mmc" {
                out.append(.init(rule: .notEligible, reason: "\(d.devnode) is a fixed \(d.bus ?? "internal") disk, not a removable USB/MMC card"))
            }
        }
        // 3. Mounted, swap, holding / or held by dm/md/LVM: overwriting a live filesystem
        //    corrupts the running system.
        //    Where the system's mounts cannot be read, any card could be one of them.
        for what in usage.unreadable {
            out.append(.init(rule: .inUse, reason: "cannot tell whether it is in use: \(what)"))
        }
        for why in usage.reasons(for: d.deviceNumber) {
            out.append(.init(rule: .inUse, reason: "in use: \(why)"))
        }
        if !d.holders.isEmpty {
            out.append(.init(rule: .inUse, reason: "in use: held by \(d.holders.joined(separator: ", ")) (device-mapper, RAID or LVM)"))
        }
        // 4. Size: an empty reader slot, a card too small for the image, a disk too big to be a card.
        if d.size == 0 {
            out.append(.init(rule: .noMedium, reason: "no medium (empty slot)"))
        } else {
            if let minimumSize, d.size < minimumSize {
                out.append(.init(rule: .tooSmall, reason: "card too small: image needs \(minimumSize) bytes, card has \(d.size)"))
            }
            if d.size > maxDeviceSize {
                out.append(.init(rule: .tooLarge, reason: "\(ByteCount.human(d.size)) is larger than the station's maximum \(ByteCount.human(maxDeviceSize)): not an SD card"))
            }
        }
        // 5. The lock switch: writing would fail half-way; say so up front.
        if d.readOnly {
            out.append(.init(rule: .readOnly, reason: "write-protected: slide the card's lock switch and reinsert it"))
        }
        return out
    }
}
