// Package docs holds no code: its tests check the documentation in
// README.md and docs/*.md. Every Go snippet there compiles
// (TestSnippetsCompile), and the README stays a front door of at most
// 15 KB (TestREADMEIsAFrontDoor).
package docs
