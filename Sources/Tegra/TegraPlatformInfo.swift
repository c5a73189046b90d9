/// The miniloader's answer to "get platform info" (72 bytes, tegra-rcm.md).
public struct TegraPlatformInfo: Sendable, Equatable, CustomStringConvertible {
    /// The chip UID (16 bytes as sent, shown as hex): the unit's identity.
    public let uid: [UInt8]
    public let chipID: UInt16
    public let chipMajor: UInt8
    public let chipMinor: UInt8
    public let sku: UInt32
    public let bootROMVersion: UInt32
    public let bootDevice: UInt32
    public let operatingMode: UInt32
    public let deviceConfigStrap: UInt32
    public let fuse: UInt32
    public let sdramStrap: UInt32
    public let boardID: [UInt32]

    /// Operating modes the flasher accepts (any other means a fused or failure-analysis part).
    public static let flashableOperatingModes: Set<UInt32> = [1, 3, 4, 5, 6]

    public init(decoding bytes: [UInt8]) throws {
        guard bytes.count == Nv3p.platformInfoLength else {
            throw TegraError(.protocolViolation,
                "platform info is \(bytes.count) bytes, expected \(Nv3p.platformInfoLength)")
        }
        uid = Array(bytes[0..<16])
        chipID = bytes.loadLE16(at: 16)
        chipMajor = bytes[18]
        chipMinor = bytes[19]
        sku = bytes.loadLE32(at: 20)
        bootROMVersion = bytes.loadLE32(at: 24)
        bootDevice = bytes.loadLE32(at: 28)
        operatingMode = bytes.loadLE32(at: 32)
        deviceConfigStrap = bytes.loadLE32(at: 36)
        fuse = bytes.loadLE32(at: 40)
        sdramStrap = bytes.loadLE32(at: 44)
        boardID = (0..<4).map { bytes.loadLE32(at: 56 + 4 * $0) }
    }

    public var uidHex: String { uid.hexString }

    public var bootDeviceName: String {
        switch bootDevice {
        case 1: "NAND"
        case 2: "eMMC"
        case 3: "SPI flash"
        default: "boot device \(bootDevice)"
        }
    }

    /// Throws unless the operating mode is one the flasher may proceed in.
    public func checkFlashable() throws {
        guard Self.flashableOperatingModes.contains(operatingMode) else {
            throw TegraError(.unsupportedOperatingMode(operatingMode),
                "the board reports operating mode \(operatingMode); only modes 1, 3, 4, 5 and 6 can be flashed "
                + "(others are failure-analysis or otherwise locked parts): not flashing")
        }
    }

    public var description: String {
        """
        UID:              \(uidHex)
        chip:             0x\(String(chipID, radix: 16)) (revision \(chipMajor).\(chipMinor)), SKU 0x\(String(sku, radix: 16))
        boot ROM version: \(hex32(bootROMVersion))
        boot device:      \(bootDeviceName)
        operating mode:   \(operatingMode)
        strap / fuse:     device config \(hex32(deviceConfigStrap)), fuse \(hex32(fuse)), SDRAM \(hex32(sdramStrap))
        board id:         \(boardID.map { hex32($0) }.joined(separator: " "))
        """
    }
}
