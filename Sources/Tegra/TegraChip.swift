/// The Tegra generations the RCM path knows, told apart by the low byte of the USB product id.
public enum TegraChip: String, Sendable, CaseIterable, CustomStringConvertible {
    case t20, t30, t114, t124

    /// NVIDIA's USB vendor id; every Tegra in recovery (APX) mode uses it.
    public static let vendorID: UInt16 = 0x0955

    /// The chip for a recovery-mode product id, or nil (T132/T210 and anything else are out of scope).
    public init?(productID: UInt16) {
        switch productID & 0xFF {
        case 0x20: self = .t20
        case 0x30: self = .t30
        case 0x35: self = .t114
        case 0x40: self = .t124
        default: return nil
        }
    }

    /// The profile spelling (`soc = "tegra124"`).
    public init?(socName: String) {
        switch socName.lowercased() {
        case "tegra20", "t20": self = .t20
        case "tegra30", "t30": self = .t30
        case "tegra114", "t114": self = .t114
        case "tegra124", "t124": self = .t124
        default: return nil
        }
    }

    public var productIDLowByte: UInt8 {
        switch self {
        case .t20: 0x20
        case .t30: 0x30
        case .t114: 0x35
        case .t124: 0x40
        }
    }

    /// The RCM message layout this chip's boot ROM expects.
    public var rcmVersion: RCMVersion {
        switch self {
        case .t20, .t30: .v1
        case .t114: .v35
        case .t124: .v40
        }
    }

    /// UID length the boot ROM sends first: T20/T30 8 bytes, T114/T124 16.
    public var uidLength: Int {
        switch self {
        case .t20, .t30: 8
        case .t114, .t124: 16
        }
    }

    /// Where the miniloader is loaded and started.
    public var miniloaderEntry: UInt32 {
        switch self {
        case .t20: 0x4000_8000
        case .t30: 0x4000_A000
        case .t114, .t124: 0x4000_E000
        }
    }

    /// Start of SDRAM, for profiles that leave `ram_base` out (T20 maps DRAM at 0).
    public var defaultRAMBase: UInt32 {
        self == .t20 ? 0x0000_0000 : 0x8000_0000
    }

    /// The mainline U-Boot SPL entry, for profiles that leave `load_address` out; only the
    /// T124 value is known (tegra-rcm.md), other chips must name theirs.
    public var defaultUBootLoadAddress: UInt32? {
        self == .t124 ? 0x8010_8000 : nil
    }

    public var description: String {
        switch self {
        case .t20: "Tegra 2 (T20)"
        case .t30: "Tegra 3 (T30)"
        case .t114: "Tegra 4 (T114)"
        case .t124: "Tegra K1 (T124)"
        }
    }
}
