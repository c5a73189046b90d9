import Foundation
import Station
import Testing
import TOMLKit

/// Profiles inside the station config: `[profiles.NAME]` with the profile keys, or a `file =` reference.
struct InlineProfileTests {
    func profiles(in text: String, directory: String = "/etc/provision") throws -> [String: Profile] {
        let (table, document) = try TOMLDocument.parse(text: text, source: "station.toml", baseDirectory: directory)
        let root = TOMLTableReader(table: table, path: [], document: document)
        guard let profiles = try root.table("profiles") else { return [:] }
        var result: [String: Profile] = [:]
        for name in profiles.table.keys {
            let reader = try #require(try profiles.table(name))
            result[name] = try Profile.parse(inline: reader, name: name)
        }
        return result
    }

    func failure(in text: String, directory: String = "/etc/provision") -> ConfigError? {
        do {
            _ = try profiles(in: text, directory: directory)
            return nil
        } catch {
            return error as? ConfigError
        }
    }

    @Test func inlineProfileAsInTheStationExample() throws {
        let parsed = try profiles(in: """
            [station]
            allow_loop_devices = true

            [profiles.demo]
            image = "images/demo.img.zst"
            verify = true

            [[slots]]
            name = "A1"
            """)
        let demo = try #require(parsed["demo"])
        #expect(demo.name == "demo")
        #expect(demo.image?.file == "/etc/provision/images/demo.img.zst")
        #expect(demo.location.file == "station.toml" && demo.location.line == 4)
    }

    @Test func inlineErrorsAreLocatedInTheStationFile() throws {
        let error = try #require(failure(in: "[station]\nledger = \"x\"\n\n[profiles.demo]\nimage = \"d.img\"\nverify = \"yes\"\n"))
        #expect(error.description == "station.toml:6: profiles.demo.verify: expected a boolean, found string \"yes\"")
    }

    @Test func inlineMissingImagePointsAtTheProfileHeader() throws {
        let error = try #require(failure(in: "[station]\n\n[profiles.demo]\ndescription = \"no image\"\n"))
        #expect(error.line == 3 && error.keyPath == "profiles.demo.image")
    }

    @Test func inlineProfileMayNotCarryAName() throws {
        let error = try #require(failure(in: "[profiles.demo]\nname = \"demo\"\nimage = \"d.img\"\n"))
        #expect(error.line == 2 && error.message.contains("unknown key \"name\""))
    }

    @Test func inlineUsersInAnArrayOfTablesAreLocated() throws {
        let error = try #require(failure(in: """
            [profiles.demo]
            image = "d.img"
            [profiles.demo.root]
            partition = 2
            [[profiles.demo.users]]
            name = "a"
            [[profiles.demo.users]]
            name = "b"
            shell = 7
            """))
        #expect(error.description == "station.toml:9: profiles.demo.users[1].shell: expected a string, found integer 7")
    }

    @Test func fileReferenceLoadsTheProfileUnderTheStationsName() throws {
        let directory = try makeTemporaryDirectory("inline-ref")
        defer { try? FileManager.default.removeItem(at: directory) }
        let boardDirectory = directory.appendingPathComponent("images/board")
        try FileManager.default.createDirectory(at: boardDirectory, withIntermediateDirectories: true)
        try "name = \"board\"\nimage = \"board.img\"\n".write(to: boardDirectory.appendingPathComponent("profile.toml"),
                                                              atomically: true, encoding: .utf8)
        let parsed = try profiles(in: "[profiles.bench]\nfile = \"images/board/profile.toml\"\n", directory: directory.path)
        let bench = try #require(parsed["bench"])
        #expect(bench.name == "bench")
        #expect(bench.image?.file == boardDirectory.appendingPathComponent("board.img").path)
    }

    @Test func fileReferenceToAMissingFileIsAnErrorOnItsLine() throws {
        let error = try #require(failure(in: "[station]\n[profiles.bench]\nfile = \"images/nope/profile.toml\"\n"))
        #expect(error.line == 3 && error.keyPath == "profiles.bench.file")
        #expect(error.message.contains("not found"))
    }

    @Test func fileReferenceWithOtherKeysIsRefused() throws {
        let error = try #require(failure(in: "[profiles.bench]\nfile = \"p.toml\"\nverify = false\n"))
        #expect(error.line == 3 && error.message.contains("unknown key \"verify\""))
    }

    @Test func errorsInsideAReferencedFileNameThatFile() throws {
        let directory = try makeTemporaryDirectory("inline-ref-bad")
        defer { try? FileManager.default.removeItem(at: directory) }
        let file = directory.appendingPathComponent("board/profile.toml")
        try FileManager.default.createDirectory(at: file.deletingLastPathComponent(), withIntermediateDirectories: true)
        try "name = \"board\"\nimage = \"board.img\"\nbmap = 3\n".write(to: file, atomically: true, encoding: .utf8)
        let error = try #require(failure(in: "[profiles.bench]\nfile = \"board/profile.toml\"\n", directory: directory.path))
        #expect(error.file == file.path && error.line == 3 && error.keyPath == "bmap")
    }

    @Test func profileFileNameMustMatchItsDirectory() throws {
        let directory = try makeTemporaryDirectory("dir-name")
        defer { try? FileManager.default.removeItem(at: directory) }
        let file = directory.appendingPathComponent("rpi/profile.toml")
        try FileManager.default.createDirectory(at: file.deletingLastPathComponent(), withIntermediateDirectories: true)
        try "# a comment\nname = \"raspberry\"\nimage = \"x.img\"\n".write(to: file, atomically: true, encoding: .utf8)
        do {
            _ = try Profile.load(file: file.path)
            Issue.record("name \"raspberry\" in rpi/ must be refused")
        } catch let error as ConfigError {
            #expect(error.line == 2 && error.keyPath == "name" && error.message.contains("directory \"rpi\""))
        }
    }
}
