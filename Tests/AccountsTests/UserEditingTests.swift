import Testing
@testable import Accounts

@Suite("useradd/usermod semantics on the four files")
struct UserEditingTests {
    static let passwd = "root:x:0:0:root:/root:/bin/bash\nold:x:1000:1000::/home/old:/bin/sh\n+::::::\n"
    static let shadow = "root:*:19000:0:99999:7:::\nold:!:19000:0:99999:7:::\n"
    static let group = "root:x:0:\nsudo:x:27:old\nold:x:1000:\n"
    static let gshadow = "root:*::\nsudo:*::old\nold:!::\n"

    func database(loginDefs: LoginDefs = LoginDefs()) throws -> AccountDatabase {
        try AccountDatabase(passwd: Self.passwd, shadow: Self.shadow, group: Self.group, gshadow: Self.gshadow,
                            loginDefs: loginDefs)
    }

    @Test func newUserGetsNextUidPrivateGroupAndShadowAging() throws {
        var db = try database()
        let applied = try db.apply(UserSpec(name: "alice", groups: ["sudo"], gecos: "Alice", password: .locked),
                                   hash: "!", today: 20000, defaultShell: "/bin/bash")
        #expect(applied == .init(name: "alice", uid: 1001, gid: 1001, home: "/home/alice", shell: "/bin/bash", created: true))
        #expect(db.passwd.rendered() == Self.passwd.replacingOccurrences(
            of: "+::::::\n", with: "alice:x:1001:1001:Alice:/home/alice:/bin/bash\n+::::::\n"))
        #expect(db.shadow.rendered() == Self.shadow + "alice:!:20000:0:99999:7:::\n")
        #expect(db.group.rendered() == "root:x:0:\nsudo:x:27:old,alice\nold:x:1000:\nalice:x:1001:\n")
        #expect(db.gshadow?.rendered() == "root:*::\nsudo:*::old,alice\nold:!::\nalice:!::\n")
    }

    @Test func uidAndGidRangesComeFromLoginDefs() throws {
        var defs = LoginDefs()
        defs.uidMin = 5000; defs.gidMin = 7000; defs.passMaxDays = 90; defs.passWarnAge = 14
        var db = try database(loginDefs: defs)
        let applied = try db.apply(UserSpec(name: "bob", password: .locked), hash: "!", today: 1, defaultShell: "/bin/sh")
        // uid 5000 is free as a gid too, so the private group takes the same number, like useradd.
        #expect(applied.uid == 5000 && applied.gid == 5000)
        #expect(db.shadowEntry(named: "bob")?.maximumDays == "90" && db.shadowEntry(named: "bob")?.warnDays == "14")
    }

    @Test func allocationStaysBelowTheLargestLinuxIdAndNoLimitIsAnEmptyAgingField() throws {
        // UID_MAX as large as a 64-bit number, and a user at the largest id: the next id would
        // be (uid_t)-1, so the lowest free one is taken, as find_new_uid does past its max.
        let defs = try LoginDefs(text: "UID_MAX 9223372036854775807\nGID_MAX 9223372036854775807\nPASS_MAX_DAYS -1\n")
        var db = try AccountDatabase(passwd: "root:x:0:0::/root:/bin/sh\ntop:x:4294967294:4294967294::/:/bin/sh\n",
                                     shadow: "root:*:1:0:99999:7:::\ntop:!:1:0:99999:7:::\n",
                                     group: "root:x:0:\ntop:x:4294967294:\n", gshadow: nil, loginDefs: defs)
        let applied = try db.apply(UserSpec(name: "lab", password: .locked), hash: "!", today: 20000, defaultShell: "/bin/sh")
        #expect(applied.uid == 1000 && applied.gid == 1000)
        #expect(db.shadowEntry(named: "lab")?.maximumDays == "", "PASS_MAX_DAYS -1 is no maximum: an empty field, as useradd writes")
        #expect(db.shadow.rendered().hasSuffix("lab:!:20000:0::7:::\n"), "\(db.shadow.rendered())")
    }

    @Test func privateGroupTakesAnotherGidWhenTheUidIsTakenAsGid() throws {
        var db = try AccountDatabase(passwd: "root:x:0:0::/root:/bin/sh\n", shadow: "root:*:1:0:99999:7:::\n",
                                     group: "root:x:0:\nlab:x:1000:\n", gshadow: nil)
        let applied = try db.apply(UserSpec(name: "carol", password: .locked), hash: "!", today: 1, defaultShell: "/bin/sh")
        #expect(applied.uid == 1000 && applied.gid == 1001)
        #expect(db.gshadow == nil)
    }

    @Test func missingSupplementaryGroupIsAnErrorLikeUseradd() throws {
        var db = try database()
        let before = db
        #expect {
            _ = try db.apply(UserSpec(name: "dave", groups: ["sudo", "video", "audio"], password: .locked),
                             hash: "!", today: 1, defaultShell: "/bin/sh")
        } throws: { error in
            guard let e = error as? AccountsError else { return false }
            return e.code == .missingGroup && e.message.contains("video, audio")
        }
        #expect(db == before)
    }

    @Test func missingGroupsAreCreatedWhenTheSpecAsks() throws {
        var db = try database()
        _ = try db.apply(UserSpec(name: "erin", groups: ["video"], createMissingGroups: true, password: .locked),
                         hash: "!", today: 1, defaultShell: "/bin/sh")
        #expect(db.group(named: "video")?.members == ["erin"])
        #expect(db.group(named: "video")?.gid == 1002) // after old (1000) and erin's own group (1001)
        #expect(db.gshadowEntry(named: "video")?.members == ["erin"])
    }

    @Test func existingUserIsUpdatedInPlaceKeepingUid() throws {
        var db = try database()
        let applied = try db.apply(UserSpec(name: "old", groups: ["sudo"], shell: "/bin/bash", password: .locked),
                                   hash: "$6$x$y", today: 20001, defaultShell: "/bin/sh")
        #expect(applied.uid == 1000 && !applied.created && applied.shell == "/bin/bash")
        #expect(db.passwd.rendered().contains("old:x:1000:1000::/home/old:/bin/bash\n"))
        #expect(db.shadow.rendered() == "root:*:19000:0:99999:7:::\nold:$6$x$y:20001:0:99999:7:::\n")
        // Already a member: not listed twice.
        #expect(db.group(named: "sudo")?.members == ["old"])
    }

    @Test func changingAnExistingUsersUidIsRefused() throws {
        var db = try database()
        #expect(throws: AccountsError.self) {
            _ = try db.apply(UserSpec(name: "old", uid: 1500, password: .locked), hash: "!", today: 1, defaultShell: "/bin/sh")
        }
    }

    @Test func explicitUidAlreadyUsedIsAConflict() throws {
        var db = try database()
        #expect { _ = try db.apply(UserSpec(name: "frank", uid: 1000, password: .locked), hash: "!", today: 1, defaultShell: "/bin/sh") }
            throws: { (($0 as? AccountsError)?.message.contains("already used by old") == true) }
    }

    @Test func groupWithTheNewUsersNameIsAConflict() throws {
        var db = try database()
        #expect { _ = try db.apply(UserSpec(name: "sudo", password: .locked), hash: "!", today: 1, defaultShell: "/bin/sh") }
            throws: { (($0 as? AccountsError)?.code == .conflict) }
    }

    @Test func invalidNamesAndFieldsAreRejected() throws {
        var db = try database()
        for spec in [UserSpec(name: "Root", password: .locked), UserSpec(name: "9lives", password: .locked),
                     UserSpec(name: "a:b", password: .locked), UserSpec(name: String(repeating: "a", count: 33), password: .locked),
                     UserSpec(name: "ok", gecos: "x:y", password: .locked), UserSpec(name: "ok", shell: "bash", password: .locked),
                     UserSpec(name: "ok", home: "/home/../etc", password: .locked),
                     UserSpec(name: "ok", password: .locked, sshKeys: ["ssh-ed25519 AAA\nroot"])] {
            #expect(throws: AccountsError.self) { _ = try db.apply(spec, hash: "!", today: 1, defaultShell: "/bin/sh") }
        }
    }

    @Test func allocationFallsBackToLowestFreeIdWhenTheTopIsTaken() throws {
        #expect(try AccountDatabase.allocate(used: [1000, 1002], min: 1000, max: 1002, what: "uid") == 1001)
        #expect(try AccountDatabase.allocate(used: [], min: 1000, max: 1002, what: "uid") == 1000)
        #expect(throws: AccountsError.self) {
            try AccountDatabase.allocate(used: [1000, 1001, 1002], min: 1000, max: 1002, what: "uid")
        }
    }
}
