mod helpers;
mod http;
mod library;
mod nodes;
mod redis;
mod reliability;
