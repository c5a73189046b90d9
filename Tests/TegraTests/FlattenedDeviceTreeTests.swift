import Foundation
import Testing
@testable import Tegra
import TestSupport

@Suite struct FlattenedDeviceTreeTests {
    /// `fdtget [options] FILE args…`: options are the arguments starting with "-" and their values.
    func fdtget(_ dtb: [UInt8], _ arguments: [String], in directory: TemporaryDirectory) throws -> String {
        let file = try directory.write("edited.dtb", dtb)
        let optionCount = arguments.first == "-t" ? 2 : (arguments.first == "-l" ? 1 : 0)
        let result = try run("fdtget", Array(arguments.prefix(optionCount)) + [file] + arguments.dropFirst(optionCount))
        #expect(result.status == 0, "fdtget: \(result.stderr)")
        return result.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    @Test func addsConfigNodeWhenMissingAndFdtgetReadsIt() throws {
        let directory = try TemporaryDirectory()
        var tree = try FlattenedDeviceTree(parsing: try compileDTS(ubootDTS, in: directory))
        #expect(tree.node(at: "/config") == nil)
        tree.setProperty(path: "/config", name: "bootdelay", value: FlattenedDeviceTree.u32Value(0xFFFF_FFFE))
        tree.setProperty(path: "/config", name: "bootcmd", value: FlattenedDeviceTree.stringValue("echo '>>> hi' ; reset"))
        let blob = tree.serialized()

        #expect(try fdtget(blob, ["-t", "x", "/config", "bootdelay"], in: directory) == "fffffffe")
        #expect(try fdtget(blob, ["/config", "bootcmd"], in: directory) == "echo '>>> hi' ; reset")
        #expect(try fdtget(blob, ["/", "model"], in: directory) == "NVIDIA Jetson TK1")
        #expect(try fdtget(blob, ["-t", "x", "/memory@80000000", "reg"], in: directory) == "80000000 80000000")
        let reparsed = try FlattenedDeviceTree(parsing: blob)
        #expect(reparsed == tree)
        #expect(reparsed.node(at: "/config")?.property("bootdelay") == [0xFF, 0xFF, 0xFF, 0xFE])
        #expect(reparsed.memoryReservations.count == 1 && reparsed.memoryReservations[0].address == 0x8000_0000)
    }

    @Test func replacesExistingConfigPropertiesInPlace() throws {
        let directory = try TemporaryDirectory()
        let source = ubootDTS.replacingOccurrences(of: "chosen {",
            with: "config { bootdelay = <3>; bootcmd = \"run distro_bootcmd\"; u-boot,mmc-env-partition = <1>; };\n    chosen {")
        var tree = try FlattenedDeviceTree(parsing: try compileDTS(source, in: directory))
        tree.setProperty(path: "/config", name: "bootdelay", value: FlattenedDeviceTree.u32Value(0xFFFF_FFFE))
        tree.setProperty(path: "/config", name: "bootcmd", value: FlattenedDeviceTree.stringValue("reset"))
        let blob = tree.serialized()
        #expect(try fdtget(blob, ["-t", "x", "/config", "bootdelay"], in: directory) == "fffffffe")
        #expect(try fdtget(blob, ["/config", "bootcmd"], in: directory) == "reset")
        #expect(try fdtget(blob, ["/config", "u-boot,mmc-env-partition"], in: directory) == "1")
        #expect(tree.node(at: "/config")?.properties.count == 3)
        #expect(try fdtget(blob, ["-l", "/"], in: directory).split(separator: "\n").filter { $0 == "config" }.count == 1)
    }

    @Test func unchangedTreeSurvivesARoundTripThroughDtc() throws {
        let directory = try TemporaryDirectory()
        let original = try compileDTS(ubootDTS, in: directory)
        let rewritten = try FlattenedDeviceTree(parsing: original).serialized()
        let a = try directory.write("a.dtb", original), b = try directory.write("b.dtb", rewritten)
        let da = try run("dtc", ["-I", "dtb", "-O", "dts", a]), db = try run("dtc", ["-I", "dtb", "-O", "dts", b])
        #expect(da.status == 0 && db.status == 0)
        #expect(da.stdout == db.stdout)
    }

    /// dtc compiles nodes nested `depth` deep (a blob of its own making, not ours).
    func nested(_ depth: Int, in directory: TemporaryDirectory) throws -> [UInt8] {
        let source = "/dts-v1/;\n/ {\n" + String(repeating: "n {\n", count: depth - 1) + String(repeating: "};\n", count: depth - 1) + "};\n"
        return try compileDTS(source, in: directory)
    }

    @Test func nodesNestedTooDeepAreAnErrorNotAStackOverflow() throws {
        let directory = try TemporaryDirectory()
        #expect(try FlattenedDeviceTree(parsing: try nested(64, in: directory)).node(at: "/" + Array(repeating: "n", count: 63).joined(separator: "/")) != nil)
        // One more is refused: 10,000 levels (a blob of ~80 KB) overflowed the stack, a frame a level.
        let error = try #require(throws: TegraError.self) { try FlattenedDeviceTree(parsing: try nested(65, in: directory)) }
        #expect(error.message.contains("nested deeper than 64"), "\(error)")
    }

    @Test func rejectsBadMagic() throws {
        let directory = try TemporaryDirectory()
        var blob = try compileDTS(ubootDTS, in: directory)
        blob[0] = 0
        #expect(throws: TegraError.self) { try FlattenedDeviceTree(parsing: blob) }
    }

    @Test func rejectsATruncatedBlob() throws {
        let directory = try TemporaryDirectory()
        let blob = try compileDTS(ubootDTS, in: directory)
        #expect(throws: TegraError.self) { try FlattenedDeviceTree(parsing: Array(blob.prefix(blob.count - 40))) }
        #expect(throws: TegraError.self) { try FlattenedDeviceTree(parsing: Array(blob.prefix(20))) }
    }

    @Test func rejectsACorruptStructureToken() throws {
        let directory = try TemporaryDirectory()
        var blob = try compileDTS(ubootDTS, in: directory)
        let structOffset = Int(blob.loadBE32(at: 8))
        blob[structOffset + 3] = 0x77
        #expect(throws: TegraError.self) { try FlattenedDeviceTree(parsing: blob) }
    }

    @Test func rejectsOldVersions() throws {
        let directory = try TemporaryDirectory()
        var blob = try compileDTS(ubootDTS, in: directory)
        blob[23] = 16
        blob[27] = 16
        #expect(throws: TegraError.self) { try FlattenedDeviceTree(parsing: blob) }
    }
}
