import Foundation
import Testing
@testable import Tegra
import TestSupport

@Suite struct FlasherPayloadTests {
    @Test func crc32MatchesTheStandardCheckValueAndPython() throws {
        #expect(CRC32.checksum(Array("123456789".utf8)) == 0xCBF4_3926)
        let data = pattern(70_000, seed: 4)
        let python = try run("python3", ["-c", "import sys,zlib; print(zlib.crc32(sys.stdin.buffer.read()))"], stdin: data)
        #expect(python.status == 0, "python3: \(python.stderr)")
        #expect(UInt32(python.stdout.trimmingCharacters(in: .whitespacesAndNewlines)) == CRC32.checksum(data))
    }

    @Test func paddedLayoutFollowsTheFormula() {
        #expect(FlasherPayload.paddedLength(nodtb: 0, dtb: 0, bss: 0) == 4096)
        #expect(FlasherPayload.paddedLength(nodtb: 4096, dtb: 0, bss: 0) == 8192)
        #expect(FlasherPayload.paddedLength(nodtb: 4097, dtb: 0, bss: 0) == 12288)
        #expect(FlasherPayload.paddedLength(nodtb: 300_001, dtb: 1234, bss: 0x31234) == (300_001 + 1234 + 0x31234 + 8191) & ~4095)
    }

    @Test func flashImageIsTheCompletedBootImageNotTheRawBCT() throws {
        let directory = try TemporaryDirectory()
        let inputs = try syntheticInputs(in: directory)
        let payload = try FlasherPayload(inputs: inputs, environment: [])
        let image = try TegraBootImage.build(bct: inputs.bct, uboot: inputs.flashedUBoot, loadAddress: inputs.loadAddress,
                                             entryPoint: inputs.loadAddress)
        #expect(payload.flashImage == image.bytes)
        #expect(payload.flashImage.count % 512 == 0)
        #expect(Array(payload.flashImage[0..<8192]) != inputs.bct, "the BCT in boot0 is completed, not the raw file")
        #expect(SimulatedTegra.bootVerdict(forBoot0: payload.flashImage)
                == .booted(bootloaderLength: inputs.flashedUBoot.count, loadAddress: inputs.loadAddress))
        // The raw BCT with U-Boot behind it, as written before: the boot ROM finds no bootloader.
        let raw = inputs.bct + [UInt8](repeating: 0, count: 0x4000 - 8192) + inputs.flashedUBoot
        guard case .fellBackToRecovery(let reason) = SimulatedTegra.bootVerdict(forBoot0: raw) else {
            Issue.record("a raw BCT must not boot")
            return
        }
        #expect(reason.contains("no bootloader"))
    }

    @Test func aBCTThatIsNotABCTIsRefusedBeforeAnything() throws {
        let directory = try TemporaryDirectory()
        var inputs = try syntheticInputs(in: directory)
        inputs.bct = pattern(8192, seed: 2)
        let error = try #require(throws: TegraError.self) { try FlasherPayload(inputs: inputs, environment: []) }
        #expect(error.kind == .invalidInput && error.message.contains("not a BCT"))
    }

    @Test func payloadIsUBootEditedDTBPaddingThenFlashImage() throws {
        let directory = try TemporaryDirectory()
        let inputs = try syntheticInputs(in: directory)
        let payload = try FlasherPayload(inputs: inputs, environment: inputs.substitutedEnvironment(uid: "00aa"))
        let bytes = payload.bytes
        #expect(Array(bytes.prefix(inputs.ubootNoDTB.count)) == inputs.ubootNoDTB)
        let dtbStart = inputs.ubootNoDTB.count
        let dtbLength = Int(bytes.loadBE32(at: dtbStart + 4))
        let tree = try FlattenedDeviceTree(parsing: Array(bytes[dtbStart..<(dtbStart + dtbLength)]))
        #expect(tree.node(at: "/config")?.property("bootdelay") == [0xFF, 0xFF, 0xFF, 0xFE])
        #expect(tree.node(at: "/config")?.property("bootcmd") == FlattenedDeviceTree.stringValue(payload.script))
        #expect(payload.paddedLength == (inputs.ubootNoDTB.count + dtbLength + inputs.ubootBSSSize + 8191) & ~4095)
        #expect(bytes[(dtbStart + dtbLength)..<payload.paddedLength].allSatisfy { $0 == 0 })
        #expect(Array(bytes[payload.paddedLength...]) == payload.flashImage)
        #expect(payload.flashImageAddress == inputs.loadAddress + UInt32(payload.paddedLength))
        #expect(payload.readBackAddress == payload.flashImageAddress + UInt32(payload.flashImage.count))
        // The flashed U-Boot is the ordinary one: nodtb + its unedited DTB, at block 1.
        #expect(Array(payload.flashImage[0x4000..<(0x4000 + inputs.ubootNoDTB.count + inputs.ubootDTB.count)])
                == inputs.ubootNoDTB + inputs.ubootDTB)
    }

    @Test func scriptChecksCRCBeforeAndAfterTheWriteThenSavesAndResets() throws {
        let directory = try TemporaryDirectory()
        let inputs = try syntheticInputs(in: directory)
        let payload = try FlasherPayload(inputs: inputs, environment: inputs.substitutedEnvironment(uid: "00aa"))
        let steps = payload.script.components(separatedBy: " ; ")
        func index(_ prefix: String, after: Int = -1) throws -> Int {
            try #require(steps.indices.first { $0 > after && steps[$0].hasPrefix(prefix) }, "no step \(prefix)")
        }
        let crc = CRC32.checksum(payload.flashImage)
        let swapped = String(format: "0x%08x", crc.byteSwapped)
        let blocks = String(format: "0x%08x", payload.flashImage.count / 512)
        let firstCRC = try index("crc32 " + String(format: "0x%08x", payload.flashImageAddress))
        #expect(steps[firstCRC].hasSuffix(" 0x80000004"))
        let firstCheck = try index("if itest.l *0x80000004 != \(swapped)", after: firstCRC)
        let dev = try index("mmc dev 0 1", after: firstCheck)
        let write = try index("mmc write " + String(format: "0x%08x", payload.flashImageAddress) + " 0 " + blocks, after: dev)
        let read = try index("mmc read " + String(format: "0x%08x", payload.readBackAddress) + " 0 " + blocks, after: write)
        let secondCRC = try index("crc32 " + String(format: "0x%08x", payload.readBackAddress), after: read)
        let secondCheck = try index("if itest.l *0x80000004 != \(swapped)", after: secondCRC)
        let envDefault = try index("env default -f -a", after: secondCheck)
        let hostname = try index("setenv hostname 'bench-07'", after: envDefault)
        let uid = try index("setenv unit_uid '00aa'", after: envDefault)
        let save = try index("saveenv", after: max(hostname, uid))
        let reset = try index("reset", after: save)
        #expect(reset == steps.count - 1)
        #expect(steps[try index("mmc write") - 1].hasPrefix("echo '>>> "))
        #expect(steps.filter { $0.hasPrefix("echo '>>> ") }.count >= 8)
    }

    @Test func unitNameFallsBackToTheUID() throws {
        let directory = try TemporaryDirectory()
        let inputs = try syntheticInputs(in: directory, unitName: nil)
        #expect(inputs.substitutedEnvironment(uid: "c0ffee").map(\.value) == ["c0ffee", "c0ffee"])
    }

    @Test(arguments: ["a'b", "x ; reset", "two\nlines"])
    func environmentValuesThatWouldBreakTheScriptAreRefused(value: String) throws {
        let directory = try TemporaryDirectory()
        let inputs = try syntheticInputs(in: directory)
        #expect(throws: TegraError.self) { try FlasherPayload(inputs: inputs, environment: [("hostname", value)]) }
    }

    @Test func environmentNamesWithShellCharactersAreRefused() throws {
        let directory = try TemporaryDirectory()
        let inputs = try syntheticInputs(in: directory)
        #expect(throws: TegraError.self) { try FlasherPayload(inputs: inputs, environment: [("host name", "x")]) }
        #expect(throws: TegraError.self) { try FlasherPayload(inputs: inputs, environment: [("", "x")]) }
    }

    @Test func malformedDTBIsAnErrorNamingTheFile() throws {
        let directory = try TemporaryDirectory()
        var inputs = try syntheticInputs(in: directory)
        inputs.ubootDTB = pattern(100, seed: 1)
        inputs.ubootDTBName = "/blobs/u-boot.dtb"
        let error = try #require(throws: TegraError.self) { try FlasherPayload(inputs: inputs, environment: []) }
        #expect(error.kind == .invalidInput && error.message.contains("/blobs/u-boot.dtb"))
    }
}
