/// The three RCM message layouts (tegra-rcm.md, "RCM messages").
public enum RCMVersion: Sendable, CaseIterable {
    case v1, v35, v40

    /// Header length: everything before the payload.
    public var headerLength: Int {
        switch self {
        case .v1: 116
        case .v35: 628
        case .v40: 644
        }
    }

    /// The value in the `rcm_version` field, and the reply to opcode 0x6.
    public var versionWord: UInt32 {
        switch self {
        case .v1: 0x0001_0000
        case .v35: 0x0035_0001
        case .v40: 0x0040_0001
        }
    }

    /// Offset of the CMAC field (v35's RSA signature shares this space).
    public var cmacOffset: Int {
        switch self {
        case .v1: 0x004
        case .v35: 0x104
        case .v40: 0x104
        }
    }

    /// Start of `reserved`: the signed area runs from here to the end of the message.
    public var signedAreaOffset: Int {
        switch self {
        case .v1: 0x014
        case .v35: 0x204
        case .v40: 0x214
        }
    }

    /// The opcode field; `len_secure`, `payload_len`, `rcm_version`, `args` and the
    /// header padding follow it at 4, 8, 12, 16 and 64 bytes on every version.
    public var opcodeOffset: Int { signedAreaOffset + (self == .v1 ? 0x10 : 0x20) }
    var lengthSecureOffset: Int { opcodeOffset + 4 }
    var payloadLengthOffset: Int { opcodeOffset + 8 }
    var versionOffset: Int { opcodeOffset + 12 }
    public var argsOffset: Int { opcodeOffset + 16 }
    var headerPaddingOffset: Int { opcodeOffset + 64 }
}

/// RCM opcodes the host sends.
public enum RCMOpcode: UInt32, Sendable {
    case sync = 0x1
    case downloadExecute = 0x4
    case bootROMVersion = 0x5
    case rcmVersion = 0x6
    case bdVersion = 0x7
}

/// One RCM message, built and signed as the boot ROM expects.
public struct RCMMessage: Sendable {
    public let version: RCMVersion
    public let bytes: [UInt8]

    /// Smallest message any boot ROM accepts: everything is padded up to at least this.
    public static let minimumLength = 1024

    /// Total length for a payload of `payloadLength` bytes under `version`:
    /// pad to 1024, then add 1–16 bytes so the payload plus padding is 16-aligned.
    public static func totalLength(version: RCMVersion, payloadLength: Int) -> Int {
        let header = version.headerLength
        var pad = max(0, minimumLength - (header + payloadLength))
        pad += 16 - ((payloadLength + pad) % 16)
        return header + payloadLength + pad
    }

    /// Builds the message; `args` are up to 12 u32 words (0x4 takes the entry address in args[0]).
    public init(version: RCMVersion, opcode: RCMOpcode, args: [UInt32] = [], payload: [UInt8] = []) throws {
        guard args.count <= 12 else {
            throw TegraError(.invalidInput, "RCM message: \(args.count) argument words given, the field holds 12")
        }
        let total = Self.totalLength(version: version, payloadLength: payload.count)
        guard total <= Int(UInt32.max) else {
            throw TegraError(.invalidInput, "RCM payload of \(payload.count) bytes is too large")
        }
        var message = [UInt8](repeating: 0, count: total)
        message.storeLE32(UInt32(total), at: 0)
        message.storeLE32(opcode.rawValue, at: version.opcodeOffset)
        message.storeLE32(UInt32(total), at: version.lengthSecureOffset)
        message.storeLE32(UInt32(payload.count), at: version.payloadLengthOffset)
        message.storeLE32(version.versionWord, at: version.versionOffset)
        for (index, word) in args.enumerated() {
            message.storeLE32(word, at: version.argsOffset + 4 * index)
        }
        message[version.headerPaddingOffset] = 0x80
        message.replaceSubrange(version.headerLength..<(version.headerLength + payload.count), with: payload)
        message[version.headerLength + payload.count] = 0x80

        let cmac = try AESCMAC.mac(Array(message[version.signedAreaOffset...]))
        message.replaceSubrange(version.cmacOffset..<(version.cmacOffset + 16), with: cmac)
        self.version = version
        self.bytes = message
    }

    /// The CMAC stored in the message.
    public var cmac: [UInt8] { Array(bytes[version.cmacOffset..<(version.cmacOffset + 16)]) }
}
