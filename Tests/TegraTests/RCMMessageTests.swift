import Foundation
import Testing
@testable import Tegra
import TestSupport

@Suite struct RCMMessageTests {
    @Test func rcmVersionQueryReproducesTheSpecVector() throws {
        let message = try RCMMessage(version: .v40, opcode: .rcmVersion)
        #expect(message.bytes.count == 1028)
        #expect(message.cmac.hexString == "01eb8a48e95c04388a2c2b877c76a8fe")
    }

    @Test func downloadExecuteReproducesTheSpecVector() throws {
        let message = try RCMMessage(version: .v40, opcode: .downloadExecute, args: [0x4000_E000],
                                     payload: (0..<48).map { UInt8($0) })
        #expect(message.cmac.hexString == "4d68c464ada13e9424864fbbacc97977")
    }

    @Test(arguments: [(0, 1028), (1000, 1652), (136_920, 137_572)])
    func totalLengthFollowsThePaddingRule(payload: Int, total: Int) {
        #expect(RCMMessage.totalLength(version: .v40, payloadLength: payload) == total)
    }

    @Test(arguments: RCMVersion.allCases)
    func smallestMessageIs1028BytesOnEveryVersion(version: RCMVersion) throws {
        #expect(try RCMMessage(version: version, opcode: .sync).bytes.count == 1028)
    }

    @Test(arguments: RCMVersion.allCases)
    func paddingAlwaysAddsOneToSixteenBytes(version: RCMVersion) {
        for payload in 0..<2000 {
            let total = RCMMessage.totalLength(version: version, payloadLength: payload)
            let pad = total - version.headerLength - payload
            #expect(total >= 1024 + 1)
            #expect((payload + pad) % 16 == 0)
            if version.headerLength + payload >= 1024 { #expect((1...16).contains(pad)) }
        }
    }

    @Test func v40FieldsSitAtTheSpecOffsets() throws {
        let payload: [UInt8] = [0xAA, 0xBB, 0xCC]
        let m = try RCMMessage(version: .v40, opcode: .downloadExecute, args: [0x4000_E000], payload: payload).bytes
        #expect(m.loadLE32(at: 0x000) == UInt32(m.count))
        #expect(m.loadLE32(at: 0x234) == 4)
        #expect(m.loadLE32(at: 0x238) == UInt32(m.count))
        #expect(m.loadLE32(at: 0x23C) == 3)
        #expect(m.loadLE32(at: 0x240) == 0x0040_0001)
        #expect(m.loadLE32(at: 0x244) == 0x4000_E000)
        #expect(m[0x274] == 0x80 && m[0x275..<0x284].allSatisfy { $0 == 0 })
        #expect(Array(m[0x284..<0x287]) == payload)
        #expect(m[0x287] == 0x80 && m[0x288...].allSatisfy { $0 == 0 })
        #expect(m[0x004..<0x104].allSatisfy { $0 == 0 }, "modulus zero")
        #expect(m[0x114..<0x234].allSatisfy { $0 == 0 }, "signature, reserved, ecid zero")
        #expect(m[0x248..<0x274].allSatisfy { $0 == 0 }, "unused args zero")
    }

    @Test func v1AndV35PutOpcodeAndVersionWhereTheSpecSays() throws {
        let v1 = try RCMMessage(version: .v1, opcode: .rcmVersion).bytes
        #expect(v1.loadLE32(at: 0x24) == 6 && v1.loadLE32(at: 0x30) == 0x0001_0000 && v1[0x64] == 0x80 && v1[0x74] == 0x80)
        let v35 = try RCMMessage(version: .v35, opcode: .rcmVersion).bytes
        #expect(v35.loadLE32(at: 0x224) == 6 && v35.loadLE32(at: 0x230) == 0x0035_0001 && v35[0x264] == 0x80 && v35[0x274] == 0x80)
    }

    @Test func tooManyArgumentWordsIsAnError() {
        #expect(throws: TegraError.self) { try RCMMessage(version: .v40, opcode: .sync, args: Array(repeating: 1, count: 13)) }
    }

    static let cmacCases: [(RCMVersion, Int)] = RCMVersion.allCases.flatMap { version in
        let edge = 1024 - version.headerLength
        return [0, 1, 15, 16, 17, edge - 1, edge, edge + 1, 884, 1000, 136_920].map { (version, $0) }
    }

    /// An independent CMAC: OpenSSL 3's `openssl mac … CMAC` over the signed area.
    @Test(arguments: cmacCases)
    func cmacAgreesWithOpenSSL(version: RCMVersion, payloadLength: Int) throws {
        let directory = try TemporaryDirectory()
        let message = try RCMMessage(version: version, opcode: .downloadExecute, args: [0x4000_E000],
                                     payload: pattern(payloadLength, seed: UInt32(payloadLength + 7)))
        let signed = try directory.write("signed.bin", Array(message.bytes[version.signedAreaOffset...]))
        let result = try run("openssl", ["mac", "-cipher", "AES-128-CBC", "-macopt",
                                         "hexkey:" + String(repeating: "0", count: 32), "-in", signed, "CMAC"])
        #expect(result.status == 0, "openssl: \(result.stderr)")
        #expect(result.stdout.trimmingCharacters(in: .whitespacesAndNewlines).lowercased() == message.cmac.hexString)
    }

    @Test func cmacOfEmptyMessageMatchesRFC4493() throws {
        // RFC 4493 example 1 uses key 2b7e1516…; with it, CMAC("") = bb1d6929e95937287fa37d129b756746.
        let key: [UInt8] = [0x2b, 0x7e, 0x15, 0x16, 0x28, 0xae, 0xd2, 0xa6, 0xab, 0xf7, 0x15, 0x88, 0x09, 0xcf, 0x4f, 0x3c]
        #expect(try AESCMAC.mac([], key: key).hexString == "bb1d6929e95937287fa37d129b756746")
        let block: [UInt8] = [0x6b, 0xc1, 0xbe, 0xe2, 0x2e, 0x40, 0x9f, 0x96, 0xe9, 0x3d, 0x7e, 0x11, 0x73, 0x93, 0x17, 0x2a]
        #expect(try AESCMAC.mac(block, key: key).hexString == "070a16b46b4d4144f79bdd9dd04a287c")
    }
}

