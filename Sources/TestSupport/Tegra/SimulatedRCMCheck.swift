import Tegra

/// What the simulated boot ROM checks in every RCM message, byte by byte (tegra-rcm.md):
/// lengths, zeroed fields, both paddings, rcm_version and the CMAC.
public struct ReceivedRCMMessage: Sendable {
    public let opcode: UInt32
    public let args: [UInt32]
    public let payload: [UInt8]

    /// Returns the decoded message, or throws a `SimulatorViolation` naming the first broken rule.
    /// `cmacKeyIsZero: false` models a secure-boot part: its key is not the zero key, so no CMAC matches.
    public init(checking message: [UInt8], version: RCMVersion, cmacKeyIsZero: Bool = true) throws {
        func fail(_ what: String) -> SimulatorViolation { SimulatorViolation("RCM message of \(message.count) bytes: \(what)") }
        let header = version.headerLength
        guard message.count >= header + 1 else { throw fail("shorter than header + padding") }
        func word(_ offset: Int) -> UInt32 {
            UInt32(message[offset]) | UInt32(message[offset + 1]) << 8 | UInt32(message[offset + 2]) << 16
                | UInt32(message[offset + 3]) << 24
        }
        let total = Int(word(0))
        guard total == message.count else { throw fail("len_insecure says \(total)") }
        let opcodeOffset = version.opcodeOffset
        guard Int(word(opcodeOffset + 4)) == total else { throw fail("len_secure \(word(opcodeOffset + 4)) != total") }
        let payloadLength = Int(word(opcodeOffset + 8))
        guard RCMMessage.totalLength(version: version, payloadLength: payloadLength) == total else {
            throw fail("payload_len \(payloadLength) does not give this total under the padding rule")
        }
        guard word(opcodeOffset + 12) == version.versionWord else {
            throw fail("rcm_version \(String(word(opcodeOffset + 12), radix: 16))")
        }
        let zeroRanges = [4..<version.cmacOffset, (version.cmacOffset + 16)..<version.signedAreaOffset,
                          version.signedAreaOffset..<opcodeOffset]
        for range in zeroRanges where message[range].contains(where: { $0 != 0 }) {
            throw fail("non-zero byte in \(range) (modulus, signature, reserved and ecid must be zero)")
        }
        let padding = opcodeOffset + 64
        guard message[padding] == 0x80, !message[(padding + 1)..<(padding + 16)].contains(where: { $0 != 0 }) else {
            throw fail("header padding is not 0x80 followed by zeros")
        }
        let tail = header + payloadLength
        guard message[tail] == 0x80, !message[(tail + 1)...].contains(where: { $0 != 0 }) else {
            throw fail("message padding after the payload is not 0x80 followed by zeros")
        }
        let opcode = word(opcodeOffset)
        let args = (0..<12).map { word(version.argsOffset + 4 * $0) }
        let usedArgs = opcode == 0x4 ? 1 : 0
        guard !args[usedArgs...].contains(where: { $0 != 0 }) else { throw fail("unused args are not zero") }
        let signed = Array(message[version.signedAreaOffset...])
        let expected = try AESCMAC.mac(signed)
        let stored = Array(message[version.cmacOffset..<(version.cmacOffset + 16)])
        guard cmacKeyIsZero, stored == expected else {
            throw SimulatorViolation(cmacKeyIsZero ? "RCM message: CMAC mismatch" : "RCM message: CMAC does not verify with this part's secure key",
                                     isSignatureFailure: true)
        }
        self.opcode = opcode
        self.args = args
        self.payload = Array(message[header..<(header + payloadLength)])
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
