import Tegra

/// The boot ROM's own knowledge of each chip, typed in from tegra-rcm.md's tables (not taken
/// from the host's `TegraChip`/`RCMVersion`): a wrong offset in the host cannot hide here.
public struct SimulatedChipSpec: Sendable {
    public let uidLength: Int
    public let miniloaderEntry: UInt32
    public let rcmVersionWord: UInt32
    public let productIDLowByte: UInt8
    /// RCM header layout (offsets from the start of the message).
    public let headerLength: Int
    public let cmacOffset: Int
    public let signedFrom: Int
    public let opcodeOffset: Int
    public let lengthSecureOffset: Int
    public let payloadLengthOffset: Int
    public let versionOffset: Int
    public let argsOffset: Int
    public let headerPaddingOffset: Int
    /// The BCT the miniloader accepts: its size, and for T124 where its signature and version sit.
    public let bctSize: Int

    public static func of(_ chip: TegraChip) -> SimulatedChipSpec {
        switch chip {
        case .t20, .t30:
            return SimulatedChipSpec(uidLength: 8, miniloaderEntry: chip == .t20 ? 0x4000_8000 : 0x4000_A000,
                                     rcmVersionWord: 0x0001_0000, productIDLowByte: chip == .t20 ? 0x20 : 0x30,
                                     headerLength: 0x74, cmacOffset: 0x04, signedFrom: 0x14, opcodeOffset: 0x24,
                                     lengthSecureOffset: 0x28, payloadLengthOffset: 0x2C, versionOffset: 0x30,
                                     argsOffset: 0x34, headerPaddingOffset: 0x64, bctSize: chip == .t20 ? 4080 : 6128)
        case .t114:
            return SimulatedChipSpec(uidLength: 16, miniloaderEntry: 0x4000_E000, rcmVersionWord: 0x0035_0001,
                                     productIDLowByte: 0x35, headerLength: 0x274, cmacOffset: 0x104, signedFrom: 0x204,
                                     opcodeOffset: 0x224, lengthSecureOffset: 0x228, payloadLengthOffset: 0x22C,
                                     versionOffset: 0x230, argsOffset: 0x234, headerPaddingOffset: 0x264, bctSize: 8192)
        case .t124:
            return SimulatedChipSpec(uidLength: 16, miniloaderEntry: 0x4000_E000, rcmVersionWord: 0x0040_0001,
                                     productIDLowByte: 0x40, headerLength: 0x284, cmacOffset: 0x104, signedFrom: 0x214,
                                     opcodeOffset: 0x234, lengthSecureOffset: 0x238, payloadLengthOffset: 0x23C,
                                     versionOffset: 0x240, argsOffset: 0x244, headerPaddingOffset: 0x274, bctSize: 8192)
        }
    }

    /// tegra-rcm.md: `pad = max(0, 1024 − (H+P))`, then `pad += 16 − ((P + pad) mod 16)`.
    public func messageLength(payload: Int) -> Int {
        var pad = max(0, 1024 - (headerLength + payload))
        pad += 16 - (payload + pad) % 16
        return headerLength + payload + pad
    }
}

func simulatorWord(_ bytes: [UInt8], _ offset: Int) -> UInt32 {
    UInt32(bytes[offset]) | UInt32(bytes[offset + 1]) << 8 | UInt32(bytes[offset + 2]) << 16 | UInt32(bytes[offset + 3]) << 24
}

func simulatorBytes(_ value: UInt32) -> [UInt8] {
    [UInt8(value & 0xFF), UInt8(value >> 8 & 0xFF), UInt8(value >> 16 & 0xFF), UInt8(value >> 24)]
}

/// What the simulated boot ROM checks in every RCM message, byte by byte (tegra-rcm.md):
/// lengths, zeroed fields, both paddings, rcm_version and the CMAC, all with its own code.
public struct ReceivedRCMMessage: Sendable {
    public let opcode: UInt32
    public let args: [UInt32]
    public let payload: [UInt8]

    /// Returns the decoded message, or throws a `SimulatorViolation` naming the first broken rule.
    /// `cmacKeyIsZero: false` models a secure-boot part: its key is not the zero key, so no CMAC matches.
    public init(checking message: [UInt8], spec: SimulatedChipSpec, cmacKeyIsZero: Bool = true) throws {
        func fail(_ what: String) -> SimulatorViolation { SimulatorViolation("RCM message of \(message.count) bytes: \(what)") }
        guard message.count >= spec.headerLength + 1 else { throw fail("shorter than header + padding") }
        let total = Int(simulatorWord(message, 0))
        guard total == message.count else { throw fail("len_insecure says \(total)") }
        guard Int(simulatorWord(message, spec.lengthSecureOffset)) == total else {
            throw fail("len_secure \(simulatorWord(message, spec.lengthSecureOffset)) != total")
        }
        let payloadLength = Int(simulatorWord(message, spec.payloadLengthOffset))
        guard spec.messageLength(payload: payloadLength) == total else {
            throw fail("payload_len \(payloadLength) does not give this total under the padding rule")
        }
        guard simulatorWord(message, spec.versionOffset) == spec.rcmVersionWord else {
            throw fail("rcm_version \(String(simulatorWord(message, spec.versionOffset), radix: 16))")
        }
        let zeroRanges = [4..<spec.cmacOffset, (spec.cmacOffset + 16)..<spec.opcodeOffset]
        for range in zeroRanges where message[range].contains(where: { $0 != 0 }) {
            throw fail("non-zero byte in \(range) (modulus, signature, reserved and ecid must be zero)")
        }
        let padding = spec.headerPaddingOffset
        guard message[padding] == 0x80, !message[(padding + 1)..<(padding + 16)].contains(where: { $0 != 0 }) else {
            throw fail("header padding is not 0x80 followed by zeros")
        }
        let tail = spec.headerLength + payloadLength
        guard message[tail] == 0x80, !message[(tail + 1)...].contains(where: { $0 != 0 }) else {
            throw fail("message padding after the payload is not 0x80 followed by zeros")
        }
        let opcode = simulatorWord(message, spec.opcodeOffset)
        let args = (0..<12).map { simulatorWord(message, spec.argsOffset + 4 * $0) }
        let usedArgs = opcode == 0x4 ? 1 : 0
        guard !args[usedArgs...].contains(where: { $0 != 0 }) else { throw fail("unused args are not zero") }
        let expected = SimulatorCrypto.cmac(Array(message[spec.signedFrom...]))
        let stored = Array(message[spec.cmacOffset..<(spec.cmacOffset + 16)])
        guard cmacKeyIsZero, stored == expected else {
            throw SimulatorViolation(cmacKeyIsZero ? "RCM message: CMAC mismatch" : "RCM message: CMAC does not verify with this part's secure key",
                                     isSignatureFailure: true)
        }
        self.opcode = opcode
        self.args = args
        self.payload = Array(message[spec.headerLength..<(spec.headerLength + payloadLength)])
    }
}

/// A rule the host broke, as the simulator saw it.
public struct SimulatorViolation: Error, Sendable, CustomStringConvertible {
    public let description: String
    public let isSignatureFailure: Bool
    public init(_ description: String, isSignatureFailure: Bool = false) {
        self.description = description
        self.isSignatureFailure = isSignatureFailure
    }
}
