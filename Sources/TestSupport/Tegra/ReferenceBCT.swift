import Foundation
import Tegra

/// A raw BCT as `cbootimage -gbct` makes it (Debian's cbootimage: a peer no one here wrote),
/// from a config text of our own, for fixtures that need a BCT a boot ROM would accept.
public enum ReferenceBCT {
    /// eMMC, 16 KiB blocks, 512-byte pages, 16 MiB partition (the Jetson TK1's boot0 geometry).
    public static func config(_ chip: TegraChip = .t124) -> String {
        let version: UInt32 = switch chip {
        case .t20: 0x0002_0001
        case .t30: 0x0003_0001
        case .t114: 0x0035_0001
        case .t124: 0x0040_0001
        }
        return """
        Version       = \(String(format: "0x%08x", version));
        BlockSize     = 0x4000;
        PageSize      = 0x200;
        PartitionSize = 0x01000000;
        OdmData       = 0x80080000;
        DevType[0] = NvBootDevType_Sdmmc;
        DeviceParam[0].SdmmcParams.ClockDivider = 0x0000000a;
        DeviceParam[0].SdmmcParams.DataWidth    = NvBootSdmmcDataWidth_8Bit;
        SDRAM[0].MemoryType          = NvBootMemoryType_Ddr3;
        SDRAM[0].PllMInputDivider    = 0x00000001;
        SDRAM[0].PllMFeedbackDivider = 0x0000004d;

        """
    }

    /// Compiles `config(chip)` in `directory` and returns the BCT's bytes.
    public static func make(_ chip: TegraChip = .t124, in directory: TemporaryDirectory) throws -> [UInt8] {
        let cfg = try directory.write("reference-bct.cfg", config(chip))
        let out = directory.file("reference.bct")
        let argument = switch chip {
        case .t20: "20"
        case .t30: "30"
        case .t114: "114"
        case .t124: "124"
        }
        let result = try Command.run(["cbootimage", "-gbct", "-t", argument, cfg, out])
        guard result.succeeded else { throw ReferenceBCTFailed(description: result.description) }
        return [UInt8](try Data(contentsOf: URL(fileURLWithPath: out)))
    }
}

public struct ReferenceBCTFailed: Error, CustomStringConvertible {
    public let description: String
}
