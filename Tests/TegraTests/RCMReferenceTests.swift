import Foundation
import Testing
@testable import Tegra
import TestSupport

/// RCM messages of all three versions against an independent builder: a Python program that
/// lays the message out from tegra-rcm.md's table and signs it with the `cryptography`
/// package's AES-CMAC (PyPI; `make test` installs it), over payload lengths around every
/// padding edge (the 1024-byte minimum and each 16-byte step).
// Serialized: these synchronous tests keep a cooperative-pool thread busy (CPU or a child
// process); one at a time leaves the pool to the async suites (the station's jobs await on it).
@Suite(.serialized, .ownThread) struct RCMReferenceTests {
    static let builder = """
    import sys
    from cryptography.hazmat.primitives import cmac
    from cryptography.hazmat.primitives.ciphers import algorithms
    # version: header length, CMAC, signed area, opcode offset, rcm_version word
    LAYOUT = {"v1": (0x74, 0x04, 0x14, 0x24, 0x00010000),
              "v35": (0x274, 0x104, 0x204, 0x224, 0x00350001),
              "v40": (0x284, 0x104, 0x214, 0x234, 0x00400001)}
    def le(v): return v.to_bytes(4, "little")
    version, opcode, entry = sys.argv[1], int(sys.argv[2]), int(sys.argv[3], 16)
    header, mac_at, signed, op, word = LAYOUT[version]
    for length in map(int, sys.argv[4:]):
        payload = bytes((i * 7 + length) & 0xFF for i in range(length))
        pad = max(0, 1024 - (header + length))
        pad += 16 - ((length + pad) % 16)
        total = header + length + pad
        m = bytearray(total)
        m[0:4] = le(total)
        m[op:op + 4] = le(opcode)
        m[op + 4:op + 8] = le(total)
        m[op + 8:op + 12] = le(length)
        m[op + 12:op + 16] = le(word)
        if opcode == 4:
            m[op + 16:op + 20] = le(entry)
        m[op + 64] = 0x80
        m[header:header + length] = payload
        m[header + length] = 0x80
        c = cmac.CMAC(algorithms.AES(bytes(16)))
        c.update(bytes(m[signed:]))
        m[mac_at:mac_at + 16] = c.finalize()
        print(m.hex())
    """

    static func payload(_ length: Int) -> [UInt8] { (0..<length).map { UInt8(truncatingIfNeeded: $0 * 7 + length) } }

    static func name(_ version: RCMVersion) -> String {
        switch version {
        case .v1: "v1"
        case .v35: "v35"
        case .v40: "v40"
        }
    }

    /// Around the 1024-byte minimum (H+P = 1023, 1024, 1025), each 16-byte step near it and
    /// far from it, the empty payload, and the T124 miniloader's size.
    static func edges(_ version: RCMVersion) -> [Int] {
        let minimumEdge = 1024 - version.headerLength
        var lengths: Set<Int> = [0, 1, 15, 16, 17, 136_920]
        for base in [minimumEdge, 2048, 4096 - version.headerLength] {
            for delta in -17...17 where base + delta >= 0 { lengths.insert(base + delta) }
        }
        return lengths.sorted()
    }

    @Test(arguments: RCMVersion.allCases)
    func everyVersionMatchesTheIndependentBuilderByteForByte(version: RCMVersion) throws {
        let lengths = Self.edges(version)
        for (opcode, entry) in [(RCMOpcode.downloadExecute, UInt32(0x4000_E000)), (.rcmVersion, 0)] {
            let usedLengths = opcode == .rcmVersion ? [0] : lengths
            let result = try run("python3", ["-c", Self.builder, Self.name(version), String(opcode.rawValue),
                                             String(entry, radix: 16)] + usedLengths.map(String.init))
            #expect(result.status == 0, "python3 (needs the cryptography package): \(result.stderr)")
            let lines = result.stdout.split(separator: "\n")
            #expect(lines.count == usedLengths.count)
            for (length, line) in zip(usedLengths, lines) {
                let message = try RCMMessage(version: version, opcode: opcode, args: opcode == .downloadExecute ? [entry] : [],
                                             payload: opcode == .downloadExecute ? Self.payload(length) : [])
                #expect(message.bytes.hexString == String(line),
                        "\(Self.name(version)) opcode \(opcode.rawValue) payload \(length): differs from the independent builder")
            }
        }
    }

    /// The simulated boot ROM's checker (its own table and AES) accepts every message the host
    /// builds, and refuses it after any single changed byte in the signed area.
    @Test(arguments: RCMVersion.allCases)
    func simulatorCheckerAgreesAndCatchesAFlippedBit(version: RCMVersion) throws {
        let chip: TegraChip = switch version {
        case .v1: .t30
        case .v35: .t114
        case .v40: .t124
        }
        let spec = SimulatedChipSpec.of(chip)
        for length in [0, 1024 - version.headerLength, 5000] {
            let message = try RCMMessage(version: version, opcode: .downloadExecute, args: [spec.miniloaderEntry],
                                         payload: Self.payload(length)).bytes
            let decoded = try ReceivedRCMMessage(checking: message, spec: spec)
            #expect(decoded.payload == Self.payload(length) && decoded.args[0] == spec.miniloaderEntry)
            var flipped = message
            flipped[spec.headerLength + length / 2] ^= 0x01
            #expect(throws: SimulatorViolation.self) { try ReceivedRCMMessage(checking: flipped, spec: spec) }
        }
    }

    /// The simulator's AES and CMAC from the standards' own examples (FIPS-197 C.1, RFC 4493 §4).
    @Test func simulatorCryptoReproducesTheStandardsVectors() {
        let fipsKey: [UInt8] = (0..<16).map { UInt8($0) }
        let fipsPlain: [UInt8] = (0..<16).map { UInt8($0 * 0x11) }
        #expect(SimulatorCrypto.aes128(block: fipsPlain, key: fipsKey).hexString == "69c4e0d86a7b0430d8cdb78070b4c55a")
        let key: [UInt8] = [0x2b, 0x7e, 0x15, 0x16, 0x28, 0xae, 0xd2, 0xa6, 0xab, 0xf7, 0x15, 0x88, 0x09, 0xcf, 0x4f, 0x3c]
        #expect(SimulatorCrypto.cmac([], key: key).hexString == "bb1d6929e95937287fa37d129b756746")
        let block: [UInt8] = [0x6b, 0xc1, 0xbe, 0xe2, 0x2e, 0x40, 0x9f, 0x96, 0xe9, 0x3d, 0x7e, 0x11, 0x73, 0x93, 0x17, 0x2a]
        #expect(SimulatorCrypto.cmac(block, key: key).hexString == "070a16b46b4d4144f79bdd9dd04a287c")
        // The spec's v40 vector, through the simulator's code.
        var m = [UInt8](repeating: 0, count: 1028)
        for (value, offset) in [(UInt32(1028), 0x000), (0x6, 0x234), (1028, 0x238), (0x0040_0001, 0x240)] {
            m.replaceSubrange(offset..<(offset + 4), with: [UInt8(value & 0xFF), UInt8(value >> 8 & 0xFF), UInt8(value >> 16 & 0xFF), UInt8(value >> 24)])
        }
        m[0x274] = 0x80
        m[0x284] = 0x80
        #expect(SimulatorCrypto.cmac(Array(m[0x214...])).hexString == "01eb8a48e95c04388a2c2b877c76a8fe")
    }

    /// cbootimage's bootloader hash equals RFC 4493 for whole blocks (checked with Python's
    /// CMAC) and differs for partial ones, where both the host and the simulator follow cbootimage.
    @Test func bootloaderHashIsCMACForWholeBlocksAndCbootimagesVariantOtherwise() throws {
        for length in [16, 4096, 1000, 1] {
            let data = Self.payload(length)
            let host = try AESCMAC.tegraBootHash(data)
            #expect(host == SimulatorCrypto.bootloaderHash(data))
            let python = try run("python3", ["-c", """
                import sys
                from cryptography.hazmat.primitives import cmac
                from cryptography.hazmat.primitives.ciphers import algorithms
                c = cmac.CMAC(algorithms.AES(bytes(16))); c.update(sys.stdin.buffer.read()); print(c.finalize().hex())
                """], stdin: data)
            let rfc = python.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
            if length % 16 == 0 { #expect(host.hexString == rfc) } else { #expect(host.hexString != rfc) }
        }
    }
}
