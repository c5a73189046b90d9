/// Where a Tegra BCT keeps the fields a boot image needs, per chip.
///
/// Offsets follow the structure order of cbootimage's `t20/t30/t114/t124/nvboot_bct_t*.h`
/// (read, not copied); the tests prove every one of them against Debian's `cbootimage`
/// and `bct_dump`. Two shapes exist:
/// - T20/T30: the AES-CMAC first, then the signed rest; the bad-block table sits just before
///   the bootloader table, and the ODM data 12 bytes before the end.
/// - T114/T124: bad-block table, RSA modulus and signature first; the signed section starts
///   after the ODM data; bootloader entries carry room for an RSA-PSS signature.
public struct BCTLayout: Sendable, Equatable {
    public let chip: TegraChip
    /// The whole BCT, as `cbootimage -gbct` writes it.
    public let size: Int
    /// The BCT's AES-CMAC (16 bytes).
    public let signatureOffset: Int
    /// Start of the signed section; it runs to the end of the BCT.
    public let signedOffset: Int
    /// `boot_data_version`, then `block_size_log2`, `page_size_log2`, `partition_size` (u32 each).
    public let bootDataVersionOffset: Int
    public let odmDataOffset: Int
    /// Bad-block table: `entries_used` u32, `virtual_blk_size_log2` u8, `block_size_log2` u8.
    public let badBlockTableOffset: Int
    /// `bootloader_used`, followed by the entries.
    public let bootloaderUsedOffset: Int
    public let bootloaderEntryStride: Int
    /// The trailing reserved bytes cbootimage fills with its padding pattern (0x80, 0…).
    public let reservedOffset: Int
    public let reservedLength: Int
    /// The value of `boot_data_version` that identifies the chip (`bct_dump`'s `Version`).
    public let bootDataVersion: UInt32

    public static let maxBootloaders = 4
    /// Entry fields, u32 each, in this order; the bootloader's AES-CMAC follows them.
    public static let entryHashOffset = 7 * 4
    /// Bits in the bad-block table (every supported chip).
    static let badBlockTableEntries: UInt32 = 4096
    /// cbootimage refuses bootloaders above 16 MiB.
    public static let maxBootloaderLength = 16 << 20

    public var blockSizeLog2Offset: Int { bootDataVersionOffset + 4 }
    public var pageSizeLog2Offset: Int { bootDataVersionOffset + 8 }
    public var partitionSizeOffset: Int { bootDataVersionOffset + 12 }
    public var signedLength: Int { size - signedOffset }

    public func bootloaderEntryOffset(_ index: Int) -> Int { bootloaderUsedOffset + 4 + index * bootloaderEntryStride }

    public static func forChip(_ chip: TegraChip) -> BCTLayout {
        switch chip {
        case .t20:
            // customer data 296 words, reserved 3 bytes; bad-block table 4 + 1 + 1 + 512 (+2 alignment).
            return BCTLayout(chip: .t20, size: 4080, signatureOffset: 0, signedOffset: 0x10, bootDataVersionOffset: 0x20,
                             odmDataOffset: 4080 - 12, badBlockTableOffset: 2704 - 520, bootloaderUsedOffset: 2704,
                             bootloaderEntryStride: 44, reservedOffset: 4080 - 3, reservedLength: 3,
                             bootDataVersion: 0x0002_0001)
        case .t30:
            return BCTLayout(chip: .t30, size: 6128, signatureOffset: 0, signedOffset: 0x10, bootDataVersionOffset: 0x20,
                             odmDataOffset: 6128 - 12, badBlockTableOffset: 3920 - 520, bootloaderUsedOffset: 3920,
                             bootloaderEntryStride: 44, reservedOffset: 6128 - 3, reservedLength: 3,
                             bootDataVersion: 0x0003_0001)
        case .t114:
            // Signature is a union (hash or 256-byte RSA-PSS): entries are 28 + 256 bytes.
            return BCTLayout(chip: .t114, size: 8192, signatureOffset: 0x310, signedOffset: 0x6E0, bootDataVersionOffset: 0x700,
                             odmDataOffset: 0x6D8, badBlockTableOffset: 0, bootloaderUsedOffset: 0x1B88,
                             bootloaderEntryStride: 0x11C, reservedOffset: 0x1FFE, reservedLength: 2,
                             bootDataVersion: 0x0035_0001)
        case .t124:
            // Signature is a struct (hash then RSA-PSS): entries are 28 + 16 + 256 bytes.
            return BCTLayout(chip: .t124, size: 8192, signatureOffset: 0x310, signedOffset: 0x6B0, bootDataVersionOffset: 0x6D0,
                             odmDataOffset: 0x6A8, badBlockTableOffset: 0, bootloaderUsedOffset: 0x1B48,
                             bootloaderEntryStride: 0x12C, reservedOffset: 0x1FFE, reservedLength: 2,
                             bootDataVersion: 0x0040_0001)
        }
    }

    /// The chip whose layout puts its own `boot_data_version` in this BCT (how cbootimage tells them apart).
    public static func detect(_ bytes: [UInt8]) -> BCTLayout? {
        for chip in TegraChip.allCases {
            let layout = forChip(chip)
            if bytes.count >= layout.size, bytes.loadLE32(at: layout.bootDataVersionOffset) == layout.bootDataVersion {
                return layout
            }
        }
        return nil
    }
}

/// One bootloader entry of a BCT.
public struct BCTBootloaderEntry: Sendable, Equatable {
    public var version: UInt32
    public var startBlock: UInt32
    public var startPage: UInt32
    public var length: UInt32
    public var loadAddress: UInt32
    public var entryPoint: UInt32
    public var attribute: UInt32
    public var hash: [UInt8]

    public static let fieldNames = ["Version", "Start block", "Start page", "Length", "Load address", "Entry point", "Attributes"]

    init(reading bct: [UInt8], at offset: Int) {
        version = bct.loadLE32(at: offset)
        startBlock = bct.loadLE32(at: offset + 4)
        startPage = bct.loadLE32(at: offset + 8)
        length = bct.loadLE32(at: offset + 12)
        loadAddress = bct.loadLE32(at: offset + 16)
        entryPoint = bct.loadLE32(at: offset + 20)
        attribute = bct.loadLE32(at: offset + 24)
        hash = Array(bct[(offset + BCTLayout.entryHashOffset)..<(offset + BCTLayout.entryHashOffset + 16)])
    }

    public init(version: UInt32, startBlock: UInt32, startPage: UInt32, length: UInt32, loadAddress: UInt32,
                entryPoint: UInt32, attribute: UInt32, hash: [UInt8]) {
        self.version = version; self.startBlock = startBlock; self.startPage = startPage; self.length = length
        self.loadAddress = loadAddress; self.entryPoint = entryPoint; self.attribute = attribute; self.hash = hash
    }

    func write(into bct: inout [UInt8], at offset: Int) {
        for (index, word) in [version, startBlock, startPage, length, loadAddress, entryPoint, attribute].enumerated() {
            bct.storeLE32(word, at: offset + 4 * index)
        }
        bct.replaceSubrange((offset + BCTLayout.entryHashOffset)..<(offset + BCTLayout.entryHashOffset + 16), with: hash)
    }
}
